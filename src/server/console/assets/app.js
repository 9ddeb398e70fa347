// imagegate console: the little script the pages use. No library, nothing inline (the
// Content-Security-Policy allows scripts from this origin only).
"use strict";

// The overview refreshes its live part every five seconds without a reload.
function refresh(live) {
  const url = live.getAttribute("data-refresh");
  setInterval(async () => {
    if (document.hidden) return;
    try {
      const resp = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (resp.redirected || !resp.ok) {
        live.setAttribute("aria-busy", "false");
        live.classList.add("stale");
        return;
      }
      const text = await resp.text();
      const doc = new DOMParser().parseFromString(text, "text/html");
      const next = doc.getElementById("live");
      if (next) {
        live.replaceChildren(...next.childNodes);
        live.classList.remove("stale");
      }
    } catch (e) {
      live.classList.add("stale");
    }
  }, 5000);
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (live) refresh(live);

  // Copy a new key's secret.
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", async () => {
      const field = document.getElementById(button.getAttribute("data-copy"));
      const status = button.parentElement.querySelector(".copied");
      try {
        await navigator.clipboard.writeText(field.value);
        if (status) status.textContent = "Copied.";
      } catch (e) {
        field.select();
        if (status) status.textContent = "Press Ctrl+C to copy.";
      }
    });
  }

  // Ask before a destructive action.
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
    });
  }

  // Show that a form is on its way (the playground waits on an upstream).
  for (const form of document.querySelectorAll("form")) {
    form.addEventListener("submit", () => {
      const button = form.querySelector("button[type=submit]");
      if (button && form.method === "post") {
        form.setAttribute("aria-busy", "true");
        button.classList.add("loading");
      }
    });
  }
});
