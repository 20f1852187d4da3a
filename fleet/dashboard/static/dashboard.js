// Fleet dashboard: keep <main> live, and send the rollout buttons to the API.
// The API takes the session cookie only with the X-Fleet-Dashboard header (see session.py).
(function () {
  "use strict";
  const main = document.getElementById("main");
  const notice = document.getElementById("notice");
  if (!main) return;
  const every = Number(main.dataset.refresh || 0);
  let busy = false;

  async function refresh() {
    if (busy || document.hidden) return;
    try {
      const response = await fetch(location.pathname + location.search, {
        headers: { "X-Fleet-Fragment": "main" },
        credentials: "same-origin",
      });
      if (response.status === 401) { location.reload(); return; }
      if (!response.ok || busy) return;
      main.innerHTML = await response.text();
      bind();
      document.body.dataset.updated = String(Date.now());
    } catch (error) {
      // The controller is away for a moment: try again at the next tick.
    }
  }

  function say(text, ok) {
    notice.textContent = text;
    notice.className = "notice " + (ok ? "ok" : "error");
  }

  function bind() {
    for (const button of main.querySelectorAll("button[data-action]")) {
      button.addEventListener("click", async () => {
        const question = button.dataset.confirm;
        if (question && !window.confirm(question)) return;
        busy = true;
        button.disabled = true;
        try {
          const response = await fetch(button.dataset.action, {
            method: "POST",
            headers: { "X-Fleet-Dashboard": "1", "Content-Type": "application/json" },
            body: "{}",
            credentials: "same-origin",
          });
          const body = await response.json().catch(() => ({}));
          if (response.ok) say(button.textContent.trim() + ": done", true);
          else say(button.textContent.trim() + " refused: " + (body.error || response.status), false);
        } catch (error) {
          say("the controller cannot be reached", false);
        } finally {
          busy = false;
          button.disabled = false;
          refresh();
        }
      });
    }
  }

  bind();
  if (every > 0) setInterval(refresh, every);
})();
