// The console's entry point: hash routes, one module per page, the token dialog.
import * as api from "./api.js";
import { clear, errorBox } from "./dom.js";
import * as overview from "./overview.js";
import * as services from "./services.js";
import * as bus from "./bus.js";
import * as sagas from "./sagas.js";
import * as events from "./events.js";

const PAGES = { "": overview, services, bus, sagas, events };

let cleanup = null;

let pendingToken = null;

// One dialog at a time: calls refused together share the answer.
function askForToken() {
  if (!pendingToken) pendingToken = showTokenDialog().finally(() => (pendingToken = null));
  return pendingToken;
}

function showTokenDialog() {
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  input.value = api.getToken();
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        const ok = dialog.returnValue === "ok" && input.value.trim() !== "";
        if (ok) api.setToken(input.value.trim());
        resolve(ok);
      },
      { once: true },
    );
    dialog.showModal();
  });
}

function route() {
  const hash = decodeURIComponent(location.hash.replace(/^#\/?/, ""));
  const [page, ...rest] = hash.split("/");
  const module = PAGES[page] || overview;
  if (cleanup) cleanup();
  cleanup = null;
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.page === (page || "overview"));
  }
  const main = clear(document.getElementById("main"));
  main.dataset.page = page || "overview";
  try {
    cleanup = module.render(main, rest.join("/")) || null;
  } catch (error) {
    main.append(errorBox(error));
  }
}

api.onTokenNeeded(askForToken);
document.getElementById("token-button").addEventListener("click", () => askForToken().then(route));
window.addEventListener("hashchange", route);
api
  .info()
  .then((info) => {
    document.getElementById("node").textContent = `${info.version || ""} · ${info.grpc_address || ""}`;
  })
  .catch(() => {});
route();
