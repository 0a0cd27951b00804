// Clean: a changed decision is saved at once (POST /api/corrections); the page says what the file now holds.
// Suspects' "relabel as <suggested>" and Duplicates' "exclude" buttons are one-click decisions.
"use strict";
const status = document.getElementById("status");

async function decide(card, value) {
  const select = card.querySelector("select.decision");
  const [decision, label] = value.split(/:(.*)/s);  // "relabel:<class>": class names may hold ':'
  const previous = select.dataset.saved ?? select.value;
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
    if (!answer.error) {
      select.value = value;
      select.dataset.saved = value;
      card.classList.toggle("decided", decision !== "keep");
    } else {
      select.value = previous;
    }
  } catch (error) {
    status.textContent = `not saved: no answer from the server (${error})`;
    status.classList.add("error");
    select.value = previous;
  } finally {
    select.disabled = false;
  }
}

for (const select of document.querySelectorAll("select.decision")) {
  select.dataset.saved = select.value;
  select.addEventListener("change", () => decide(select.closest(".candidate"), select.value));
}
for (const button of document.querySelectorAll("button.accept")) {
  button.addEventListener("click", () => decide(button.closest(".candidate"), `relabel:${button.dataset.label}`));
}
for (const button of document.querySelectorAll("button.exclude")) {
  button.addEventListener("click", () => decide(button.closest(".candidate"), "exclude"));
}
