// Events: the streams written recently, one stream read page by page, and the global log ($all)
// tailed live from EventStore/SubscribeToAll.
import * as api from "./api.js";
import { clear, errorBox, h, link, payload, section, table, time } from "./dom.js";

const RECENT = 500;
const TAIL_BACKLOG = 20;
const TAIL_KEEP = 200;
const PAGE = 20;

function eventRow(e, withStream) {
  return h(
    "tr",
    { "data-position": e.position, "data-stream": e.stream, "data-type": e.eventType },
    withStream ? h("td", {}, link(`#/events/${encodeURIComponent(e.stream)}`, e.stream)) : null,
    h("td", { class: "num" }, e.streamRevision || "0"),
    h("td", { class: "num" }, e.position || ""),
    h("td", {}, e.eventType || ""),
    h("td", {}, time(e.recordedAt)),
    h("td", {}, payload(e.data, e.contentType)),
  );
}

async function recentStreams(lastPosition) {
  const from = Math.max(1, lastPosition - RECENT + 1);
  const response = await api.call("EventStore/ReadAll", { fromPosition: String(from), pageSize: RECENT });
  const seen = new Map();
  for (const e of response.events || []) seen.set(e.stream, { stream: e.stream, revision: e.streamRevision || "0", at: e.recordedAt });
  return [...seen.values()].reverse();
}

function renderMain(main, isLive) {
  const streams = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const status = h("p", { class: "muted", id: "tail-status" }, "Connecting…");
  const tbody = h("tbody", {});
  const open = h("input", { type: "text", id: "open-stream", placeholder: "stream name", size: 40 });
  const form = h(
    "form",
    { class: "toolbar" },
    open,
    h("button", { type: "submit" }, "Read stream"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (open.value.trim()) location.hash = `#/events/${encodeURIComponent(open.value.trim())}`;
  });
  main.append(
    h("h1", {}, "Events"),
    form,
    section("Streams written recently", streams),
    section(
      "$all, live",
      status,
      h(
        "table",
        { id: "events-log" },
        h("thead", {}, h("tr", {}, ["Stream", "Revision", "Position", "Type", "Recorded", "Data"].map((t) => h("th", {}, t)))),
        tbody,
      ),
    ),
  );
  let tail = null;
  let received = 0;
  (async () => {
    const head = await api.call("EventStore/ReadAll", { fromPosition: "0", pageSize: 1 });
    const last = Number(head.lastPosition || 0);
    const list = await recentStreams(last);
    if (!isLive()) return;
    clear(streams).append(
      list.length
        ? table(
            ["Stream", "Last revision", "Last event"],
            list.map((s) => h("tr", { "data-stream": s.stream }, h("td", {}, link(`#/events/${encodeURIComponent(s.stream)}`, s.stream)), h("td", { class: "num" }, s.revision), h("td", {}, time(s.at)))),
            { id: "streams" },
          )
        : h("p", {}, "No event stored yet."),
    );
    // Resumes after the last position seen when the stream reopens (a control-plane restart, a network
    // error): no event is shown twice or skipped.
    let after = Math.max(0, last - TAIL_BACKLOG);
    tail = api.liveStream(
      "EventStore/SubscribeToAll",
      () => ({ afterPosition: String(after) }),
      (response) => {
        for (const e of response.events || []) {
          received += 1;
          after = Math.max(after, Number(e.position || 0));
          tbody.prepend(eventRow(e, true));
        }
        after = Math.max(after, Number(response.checkpoint || 0));
        while (tbody.children.length > TAIL_KEEP) tbody.lastElementChild.remove();
        if (response.caughtUp) status.dataset.caughtUp = "true";
        status.className = "muted";
        status.textContent = `Live${status.dataset.caughtUp ? "" : " (catching up)"}: ${received} events received; checkpoint ${response.checkpoint || ""}.`;
      },
      {
        onStatus: (state) => {
          if (state.live || !isLive()) return;
          status.className = "error";
          status.textContent = `${state.error.message || state.error}${state.final ? "" : `; reconnecting after position ${after}…`}`;
        },
      },
    );
    if (!isLive()) tail.cancel();
  })().catch((error) => {
    if (isLive()) clear(streams).append(errorBox(error));
  });
  return () => {
    if (tail) tail.cancel();
  };
}

function renderStream(main, name, isLive) {
  const tokens = [""];
  let index = 0;
  const info = h("p", { class: "muted", id: "page-info" });
  const body = h("div", {});
  const previous = h("button", { type: "button", id: "previous-page" }, "Previous page");
  const next = h("button", { type: "button", id: "next-page" }, "Next page");
  const load = async () => {
    try {
      const response = await api.call("EventStore/ReadStream", {
        stream: name,
        fromRevision: "0",
        direction: "READ_DIRECTION_FORWARDS",
        pageSize: PAGE,
        pageToken: tokens[index],
      });
      if (!isLive()) return;
      const events = response.events || [];
      if (response.nextPageToken) tokens[index + 1] = response.nextPageToken;
      next.disabled = !response.nextPageToken;
      previous.disabled = index === 0;
      const first = events.length ? events[0].streamRevision || "0" : "-";
      const last = events.length ? events[events.length - 1].streamRevision || "0" : "-";
      info.textContent = `Page ${index + 1}: revisions ${first} to ${last}; the stream's current revision is ${response.currentRevision ?? "-1"}.`;
      clear(body).append(
        events.length
          ? table(["Revision", "Position", "Type", "Recorded", "Data"], events.map((e) => eventRow(e, false)), { id: "stream-events" })
          : h("p", {}, Number(response.currentRevision ?? -1) < 0 ? "This stream does not exist." : "No event on this page."),
      );
    } catch (error) {
      clear(body).append(errorBox(error));
    }
  };
  previous.addEventListener("click", () => {
    if (index > 0) index -= 1;
    load();
  });
  next.addEventListener("click", () => {
    if (tokens[index + 1]) index += 1;
    load();
  });
  main.append(h("h1", {}, h("a", { href: "#/events" }, "Events"), " / ", name), info, h("div", { class: "toolbar" }, previous, next), body);
  load();
  return null;
}

export function render(main, arg) {
  let active = true;
  const isLive = () => active;
  const cleanup = arg ? renderStream(main, arg, isLive) : renderMain(main, isLive);
  return () => {
    active = false;
    if (cleanup) cleanup();
  };
}
