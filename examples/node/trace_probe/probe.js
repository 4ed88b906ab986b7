// Calls echo.v1.Echo/Echo with a W3C traceparent (and an x-correlation-id) in the metadata,
// as any OpenTelemetry-instrumented (or hand-written) non-Python client would, and prints
// one JSON line: the trace context it sent and the answer.
//
//   node probe.js HOST:PORT [CORRELATION_ID]
'use strict';

const path = require('path');
const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const target = process.argv[2];
const correlationId = process.argv[3] || '';
if (!target) {
  console.error('usage: node probe.js HOST:PORT [CORRELATION_ID]');
  process.exit(2);
}

const protoRoot = path.resolve(__dirname, '..', '..', 'protos');
const definition = protoLoader.loadSync(path.join(protoRoot, 'echo', 'v1', 'echo.proto'), {
  includeDirs: [protoRoot],
  keepCase: true,
  defaults: true,
});
const echo = grpc.loadPackageDefinition(definition).echo.v1;
const client = new echo.Echo(target, grpc.credentials.createInsecure());

const traceId = crypto.randomBytes(16).toString('hex');
const parentSpanId = crypto.randomBytes(8).toString('hex');
const metadata = new grpc.Metadata();
metadata.set('traceparent', `00-${traceId}-${parentSpanId}-01`);
if (correlationId) {
  metadata.set('x-correlation-id', correlationId);
}

const deadline = new Date(Date.now() + 20000);
client.Echo({ message: 'from node' }, metadata, { deadline }, (err, reply) => {
  if (err) {
    console.error(`call failed: ${err.code} ${err.details}`);
    process.exit(1);
  }
  console.log(JSON.stringify({ trace_id: traceId, parent_span_id: parentSpanId, reply }));
  client.close();
});
