// Try it: each dropped or chosen photo is shown at once and sent alone to /api/predict; its top-5 comes back.
"use strict";
const drop = document.getElementById("drop");
const input = document.getElementById("photos");
const results = document.getElementById("predictions");
const template = document.getElementById("prediction");
const limit = Number(drop.dataset.maxUpload);

function percent(probability) {
  return (100 * probability).toFixed(1) + " %";
}

function showTop(card, predictions) {
  const list = card.querySelector(".top");
  for (const { label, probability } of predictions) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label;  // text, never markup: class names come from file names
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = percent(probability).replace(" ", "");
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "probability";
    value.textContent = percent(probability);
    item.append(name, bar, value);
    list.append(item);
  }
}

function fail(card, message) {
  card.classList.add("failed");
  const status = card.querySelector(".status");
  status.classList.add("error");
  status.textContent = message;
}

async function predict(file) {
  const card = template.content.firstElementChild.cloneNode(true);
  card.dataset.name = file.name;
  card.querySelector(".name").textContent = file.name;
  card.querySelector("img").src = URL.createObjectURL(file);
  card.querySelector("img").alt = file.name;
  results.prepend(card);
  if (file.size > limit) {  // the server refuses it too; this saves sending it
    fail(card, `${file.name}: larger than the ${drop.dataset.maxUploadMb} MB limit (petpipe serve --max-upload-mb)`);
    return;
  }
  try {
    const response = await fetch("/api/predict?name=" + encodeURIComponent(file.name),
                                 { method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" } });
    const answer = await response.json();
    if (answer.error) {
      fail(card, answer.error);
      return;
    }
    card.querySelector(".status").textContent = "";
    showTop(card, answer.predictions);
    card.classList.add("done");
  } catch (error) {
    fail(card, `${file.name}: no answer from the server (${error})`);
  }
}

input.addEventListener("change", () => {
  for (const file of input.files) predict(file);
  input.value = "";
});
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  for (const file of event.dataTransfer.files) predict(file);
});
