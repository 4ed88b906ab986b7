// A Node.js member of an rpcmesh mesh, using nothing but @grpc/grpc-js and the
// .proto contracts: it serves Echo and registers it with the Registry, keeps
// its lease alive, publishes and consumes on the Bus, runs a saga whose step
// calls this very Node service, drives a saga whose compensation fails to
// FAILED_COMPENSATION and gets it out with the operator verb RetryCompensation
// once the (Node) participant is fixed, and calls a Python service through the
// gateway.
//
//   node mesh_client.js --target 127.0.0.1:50051 [--gateway 127.0.0.1:PORT]
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const ROOT = path.resolve(__dirname, '..', '..');
const LOAD_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

function load(file, includeDir) {
  const definition = protoLoader.loadSync(file, { ...LOAD_OPTIONS, includeDirs: [includeDir] });
  return grpc.loadPackageDefinition(definition);
}

const mesh = load('rpcmesh/v1/registry.proto', path.join(ROOT, 'protos')).rpcmesh.v1;
const bus = load('rpcmesh/v1/bus.proto', path.join(ROOT, 'protos')).rpcmesh.v1;
const saga = load('rpcmesh/v1/saga.proto', path.join(ROOT, 'protos')).rpcmesh.v1;
const echoDefinition = protoLoader.loadSync('echo/v1/echo.proto', {
  ...LOAD_OPTIONS,
  includeDirs: [path.join(ROOT, 'examples', 'protos')],
});
const echo = grpc.loadPackageDefinition(echoDefinition).echo.v1;
const EchoRequest = protobuf
  .loadSync(path.join(ROOT, 'examples', 'protos', 'echo', 'v1', 'echo.proto'))
  .lookupType('echo.v1.EchoRequest');

function arg(name, fallback) {
  const index = process.argv.indexOf(`--${name}`);
  return index >= 0 ? process.argv[index + 1] : fallback;
}

function call(client, method, request, timeoutMs = 10000) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + timeoutMs }, (err, response) =>
      err ? reject(err) : resolve(response));
  });
}

function log(message) {
  process.stdout.write(`node: ${message}\n`);
}

// A saga participant method without a .proto: the coordinator sends and keeps raw bytes, so a
// handler may take and give Buffers. Its compensation fails until `ledger.broken` is cleared.
const raw = (b) => b;
const LEDGER_SERVICE = {
  Undo: { path: '/node.demo.Ledger/Undo', requestStream: false, responseStream: false,
    requestSerialize: raw, requestDeserialize: raw, responseSerialize: raw, responseDeserialize: raw },
};
const ledger = { broken: true, calls: [] };

async function serveEcho(instanceId) {
  const server = new grpc.Server();
  server.addService(echo.Echo.service, {
    Echo: (callObj, callback) =>
      callback(null, { message: `node says: ${callObj.request.message}`, instance_id: instanceId, served: 1 }),
  });
  server.addService(LEDGER_SERVICE, {
    Undo: (callObj, callback) => {
      // The participant contract (saga.proto): x-saga-id, x-saga-step, x-saga-phase, x-idempotency-key, ...
      const meta = (key) => callObj.metadata.get(key)[0];
      ledger.calls.push({ phase: meta('x-saga-phase'), key: meta('x-idempotency-key') });
      if (ledger.broken) callback({ code: grpc.status.FAILED_PRECONDITION, details: 'ledger offline' });
      else callback(null, Buffer.alloc(0));
    },
  });
  const port = await new Promise((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) =>
      err ? reject(err) : resolve(p)));
  return { server, address: `127.0.0.1:${port}` };
}

function keepLeaseAlive(registry, leaseId, leaseToken, ttlSeconds) {
  const stream = registry.KeepAlive();
  stream.on('data', (response) => {
    if (response.code !== 0) log(`lease ${response.lease_id} lost (${response.message}); would register again`);
  });
  stream.on('error', () => {});
  const timer = setInterval(() => stream.write({ lease_id: leaseId, lease_token: leaseToken }),
    (ttlSeconds * 1000) / 3);
  stream.write({ lease_id: leaseId, lease_token: leaseToken });
  return () => { clearInterval(timer); stream.end(); };
}

async function busRoundTrip(busClient) {
  const topic = `node.demo.${process.pid}`;
  const subscription = busClient.Subscribe();
  const received = new Promise((resolve, reject) => {
    subscription.on('data', (response) => {
      for (const delivery of response.deliveries) {
        const m = delivery.message;
        subscription.write({ ack: { refs: [{ topic: m.topic, sequence: m.sequence }] } });
        resolve(m);
      }
    });
    subscription.on('error', (err) => { if (err.code !== grpc.status.CANCELLED) reject(err); });
  });
  subscription.write({ open: { topic, group: 'node-readers', mode: 'DELIVERY_MODE_GROUP', start: { earliest: true } } });
  const published = await call(busClient, 'Publish', {
    topic,
    messages: [{ payload: Buffer.from(JSON.stringify({ hello: 'from node' })), content_type: 'application/json',
      headers: { 'x-correlation-id': `node-${process.pid}` } }],
  });
  log(`bus published ${topic} sequence ${published.results[0].sequence}`);
  const message = await received;
  log(`bus received ${message.payload.toString()} with x-correlation-id ${message.headers['x-correlation-id']}`);
  subscription.cancel();
}

const TERMINAL = ['SAGA_STATE_COMPLETED', 'SAGA_STATE_COMPENSATED', 'SAGA_STATE_FAILED_COMPENSATION',
  'SAGA_STATE_ABORTED', 'SAGA_STATE_RESOLVED_MANUALLY'];

async function runSaga(sagaClient) {
  // The step's request is the saga input: an encoded echo.v1.EchoRequest.
  const encoded = Buffer.from(EchoRequest.encode(EchoRequest.create({ message: 'saga from node' })).finish());
  const started = await call(sagaClient, 'StartSaga', {
    definition: {
      name: 'node-echo',
      steps: [{ name: 'echo', service: 'echo-node', method: '/echo.v1.Echo/Echo', no_compensation: true,
        request: { base_from: 'input' } }],
    },
    input: encoded,
    idempotency_key: `node-${process.pid}`,
  });
  log(`saga ${started.saga.saga_id} started`);
  const final = await new Promise((resolve, reject) => {
    const watch = sagaClient.WatchSaga({ saga_id: started.saga.saga_id });
    watch.on('data', (response) => {
      log(`saga transition ${response.transition.kind} -> ${response.saga.state}`);
      if (TERMINAL.includes(response.saga.state)) {
        resolve(response.saga);
        watch.cancel();
      }
    });
    watch.on('error', (err) => { if (err.code !== grpc.status.CANCELLED) reject(err); });
  });
  log(`saga ${final.saga_id} ended ${final.state}`);
  return final;
}

async function waitEnded(sagaClient, sagaId) {
  for (;;) {
    const { saga: current } = await call(sagaClient, 'GetSaga', { saga_id: sagaId, wait: { seconds: 5 } });
    if (TERMINAL.includes(current.state)) return current;
  }
}

async function expectError(promise, code) {
  try {
    await promise;
  } catch (err) {
    if (err.code === code) return err;
    throw err;
  }
  throw new Error(`expected status ${code}`);
}

async function repairSaga(sagaClient, completedSagaId) {
  // A completed saga has nothing to retry: the precise status, nothing changes.
  const refused = await expectError(
    call(sagaClient, 'RetryCompensation', { saga_id: completedSagaId }), grpc.status.FAILED_PRECONDITION);
  log(`retry-compensation of a completed saga: FAILED_PRECONDITION ${refused.details}`);
  // Step "echo" succeeds, step "fail" calls a method nobody serves (UNIMPLEMENTED: not retried),
  // so "echo" is compensated by /node.demo.Ledger/Undo, which fails while the ledger is broken.
  const input = Buffer.from(EchoRequest.encode(EchoRequest.create({ message: 'to undo' })).finish());
  const started = await call(sagaClient, 'StartSaga', {
    definition: {
      name: 'node-repair',
      steps: [
        { name: 'echo', service: 'echo-node', method: '/echo.v1.Echo/Echo',
          compensation_method: '/node.demo.Ledger/Undo', request: { base_from: 'input' } },
        { name: 'fail', service: 'echo-node', method: '/node.demo.Ledger/Missing', no_compensation: true,
          request: { base_from: 'input' } },
      ],
    },
    input,
    idempotency_key: `node-repair-${process.pid}`,
  });
  const stuck = await waitEnded(sagaClient, started.saga.saga_id);
  log(`saga ${stuck.saga_id} ended ${stuck.state}: ${stuck.error}`);
  if (stuck.state !== 'SAGA_STATE_FAILED_COMPENSATION') throw new Error(`unexpected ${stuck.state}`);
  const noReason = await expectError(
    call(sagaClient, 'ResolveSaga', { saga_id: stuck.saga_id, reason: '' }), grpc.status.INVALID_ARGUMENT);
  log(`resolve without a reason: INVALID_ARGUMENT ${noReason.details}`);
  ledger.broken = false; // the participant is fixed
  const retried = await call(sagaClient, 'RetryCompensation', { saga_id: stuck.saga_id, reason: 'ledger back' });
  log(`retry-compensation accepted: ${retried.saga.state}`);
  const repaired = await waitEnded(sagaClient, stuck.saga_id);
  const keys = [...new Set(ledger.calls.map((c) => c.key))];
  log(`saga ${repaired.saga_id} ended ${repaired.state} after ${ledger.calls.length} compensation calls `
    + `with x-idempotency-key ${keys.join(', ')}`);
  return repaired;
}

async function main() {
  const target = arg('target', '127.0.0.1:50051');
  const gateway = arg('gateway', '');
  const credentials = grpc.credentials.createInsecure();
  const registry = new mesh.Registry(target, credentials);
  const instanceId = `node-${process.pid}`;

  const { server, address } = await serveEcho(instanceId);
  const registered = await call(registry, 'Register', {
    instance: { service: 'echo-node', instance_id: instanceId, address, version: process.version, tags: ['node'] },
    ttl: { seconds: 10 },
  });
  log(`registered echo-node/${registered.instance_id} at ${address} lease ${registered.lease_id}`);
  const stopKeepAlive = keepLeaseAlive(registry, registered.lease_id, registered.lease_token, 10);

  const resolved = await call(registry, 'Resolve', { service: 'echo-node' });
  log(`resolved echo-node: ${resolved.instances.map((i) => i.address).join(', ')}`);

  await busRoundTrip(new bus.Bus(target, credentials));
  const sagaClient = new saga.SagaCoordinator(target, credentials);
  const finished = await runSaga(sagaClient);
  const repaired = await repairSaga(sagaClient, finished.saga_id);

  if (gateway) {
    const viaGateway = new echo.Echo(gateway, credentials);
    const reply = await call(viaGateway, 'Echo', { message: 'hello from node' });
    log(`gateway answered "${reply.message}" from python instance ${reply.instance_id}`);
  }

  stopKeepAlive();
  await call(registry, 'Deregister', { service: 'echo-node', instance_id: instanceId,
    lease_token: registered.lease_token });
  log('deregistered');
  server.forceShutdown();
  registry.close();
  const ok = finished.state === 'SAGA_STATE_COMPLETED' && repaired.state === 'SAGA_STATE_COMPENSATED';
  log(ok ? 'done' : `sagas did not end as expected: ${finished.state}, ${repaired.state}`);
  process.exit(ok ? 0 : 1);
}

main().catch((err) => {
  process.stderr.write(`node: failed: ${err.message}\n`);
  process.exit(1);
});
