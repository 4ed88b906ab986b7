// Bus: topics with retention and message counts; a topic's consumer groups (pending, in flight,
// ack floor, lag) and their dead letters (reason, attempts, last error, payload) with replay and purge.
import * as api from "./api.js";
import { clear, errorBox, formatSeconds, h, link, payload, seconds, table, time } from "./dom.js";

function retention(r) {
  if (!r) return "unbounded";
  const parts = [];
  if (Number(r.maxMessages || 0)) parts.push(`${r.maxMessages} messages`);
  if (Number(r.maxBytes || 0)) parts.push(`${r.maxBytes} bytes`);
  if (r.maxAge && seconds(r.maxAge)) parts.push(formatSeconds(seconds(r.maxAge)));
  return parts.length ? parts.join(", ") : "unbounded";
}

async function renderList(main, isLive) {
  const topics = [];
  let pageToken = "";
  do {
    const response = await api.call("Bus/ListTopics", { pageSize: 1000, pageToken });
    topics.push(...(response.topics || []));
    pageToken = response.nextPageToken || "";
  } while (pageToken && topics.length < 20000);
  if (!isLive()) return;
  const rows = topics.map((t) => {
    const groups = t.groups || [];
    const dead = groups.reduce((n, g) => n + Number(g.deadLetters || 0), 0);
    return h(
      "tr",
      { "data-topic": t.name },
      h("td", {}, link(`#/bus/${encodeURIComponent(t.name)}`, t.name)),
      h("td", { class: "num" }, t.messageCount || "0"),
      h("td", { class: "num" }, `${t.firstSequence || 0} – ${t.lastSequence || 0}`),
      h("td", {}, retention(t.retention)),
      h("td", {}, groups.map((g) => h("span", { class: "tag" }, g.name))),
      h("td", { class: "num" }, dead ? h("span", { class: "badge failed" }, String(dead)) : "0"),
    );
  });
  clear(main).append(
    h("h1", {}, "Bus topics"),
    rows.length
      ? table(["Topic", "Messages", "Sequences", "Retention", "Groups", "Dead letters"], rows, { id: "topics" })
      : h("p", {}, "No topic yet."),
  );
}

function deadLetterRows(topic, group, letters, act) {
  return letters.map((d) => {
    const m = d.message || {};
    const seq = d.deadLetterSequence;
    return h(
      "tr",
      { "data-dead-letter": seq, "data-group": group },
      h("td", { class: "num" }, seq),
      h("td", {}, m.id || "", h("div", { class: "muted" }, `seq ${m.sequence || ""} · ${m.contentType || ""}`)),
      h("td", {}, d.reason || ""),
      h("td", { class: "num" }, d.attempts || 0),
      h("td", { class: "last-error" }, d.lastError || ""),
      h("td", {}, time(d.deadAt)),
      h("td", {}, payload(m.payload, m.contentType)),
      h(
        "td",
        {},
        h("button", { type: "button", class: "replay", onclick: () => act("replay", { deadLetterSequences: [seq] }) }, "Replay"),
        " ",
        h("button", { type: "button", class: "purge danger", onclick: () => act("purge", { deadLetterSequences: [seq] }) }, "Purge"),
      ),
    );
  });
}

async function renderTopic(main, name, isLive, rerender, notice) {
  const { topic } = await api.call("Bus/GetTopic", { name });
  const groups = topic.groups || [];
  const letters = await Promise.all(
    groups.map((g) =>
      Number(g.deadLetters || 0) > 0
        ? api.call("Bus/ListDeadLetters", { topic: name, group: g.name, pageSize: 100 }).then((r) => r.deadLetters || [])
        : Promise.resolve([]),
    ),
  );
  if (!isLive()) return;
  const groupRows = groups.map((g) =>
    h(
      "tr",
      { "data-group": g.name },
      h("td", {}, g.name),
      h("td", { class: "num pending" }, g.pending || "0"),
      h("td", { class: "num" }, g.inFlight || "0"),
      h("td", { class: "num" }, g.ackFloor || "0"),
      h("td", { class: "num" }, String(Math.max(0, Number(topic.lastSequence || 0) - Number(g.ackFloor || 0)))),
      h("td", { class: "num dead-count" }, g.deadLetters || "0"),
    ),
  );
  const sections = groups.map((g, index) => {
    const reason = h("input", { type: "text", placeholder: "reason (required to purge)", size: 32, class: "purge-reason" });
    const act = async (kind, selection) => {
      try {
        if (kind === "replay") {
          const r = await api.call("Bus/ReplayDeadLetters", { topic: name, group: g.name, ...selection });
          notice.replaceChildren(h("div", { class: "notice" }, `Replayed ${r.replayed || 0} dead letter(s) to group ${g.name}.`));
        } else {
          if (!reason.value.trim()) {
            notice.replaceChildren(errorBox("A reason is required to purge dead letters."));
            reason.focus();
            return;
          }
          const r = await api.call("Bus/PurgeDeadLetters", { topic: name, group: g.name, reason: reason.value.trim(), ...selection });
          notice.replaceChildren(h("div", { class: "notice" }, `Purged ${r.purged || 0} dead letter(s) of group ${g.name}.`));
        }
        await rerender();
      } catch (error) {
        notice.replaceChildren(errorBox(error));
      }
    };
    if (!letters[index].length) return null;
    return h(
      "section",
      { "data-dead-letters": g.name },
      h("h2", {}, `Dead letters of group ${g.name}`),
      h(
        "div",
        { class: "toolbar" },
        h("button", { type: "button", class: "replay-all", onclick: () => act("replay", {}) }, "Replay all"),
        reason,
        h("button", { type: "button", class: "purge-all danger", onclick: () => act("purge", { all: true }) }, "Purge all"),
      ),
      table(
        ["DL seq", "Message", "Reason", "Attempts", "Last error", "Dead at", "Payload", ""],
        deadLetterRows(name, g.name, letters[index], act),
        { class: "dead-letters" },
      ),
    );
  });
  clear(main).append(
    h("h1", {}, h("a", { href: "#/bus" }, "Bus"), " / ", name),
    notice,
    h(
      "dl",
      { class: "facts" },
      h("dt", {}, "Messages"), h("dd", {}, topic.messageCount || "0"),
      h("dt", {}, "Sequences"), h("dd", {}, `${topic.firstSequence || 0} – ${topic.lastSequence || 0}`),
      h("dt", {}, "Retention"), h("dd", {}, retention(topic.retention)),
    ),
    h("h2", {}, "Consumer groups"),
    groupRows.length
      ? table(["Group", "Pending", "In flight", "Ack floor", "Lag", "Dead letters"], groupRows, { id: "groups" })
      : h("p", {}, "No consumer group."),
    h("div", { class: "toolbar" }, h("button", { type: "button", id: "refresh", onclick: () => rerender() }, "Refresh")),
    ...sections.filter(Boolean),
  );
}

export function render(main, arg) {
  let live = true;
  const isLive = () => live;
  const notice = h("div", { id: "bus-notice" });
  const show = () =>
    (arg ? renderTopic(main, arg, isLive, show, notice) : renderList(main, isLive)).catch((error) => {
      if (live) clear(main).append(h("h1", {}, "Bus"), errorBox(error));
    });
  show();
  return () => {
    live = false;
  };
}
