// Clean: a changed decision is saved at once (POST /api/corrections); the page says what the file now holds.
"use strict";
const status = document.getElementById("status");

for (const select of document.querySelectorAll("select.decision")) {
  select.addEventListener("change", async () => {
    const card = select.closest(".candidate");
    const [decision, label] = select.value.split(/:(.*)/s);  // "relabel:<class>": class names may hold ':'
    select.disabled = true;
    try {
      const response = await fetch("/api/corrections", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ path: card.dataset.path, decision, label: label || "" }),
      });
      const answer = await response.json();
      status.textContent = answer.error ? `not saved: ${answer.error}` : answer.message;
      status.classList.toggle("error", Boolean(answer.error));
      if (!answer.error) card.classList.toggle("decided", decision !== "keep");
    } catch (error) {
      status.textContent = `not saved: no answer from the server (${error})`;
      status.classList.add("error");
    } finally {
      select.disabled = false;
    }
  });
}
