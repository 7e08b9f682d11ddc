// Web page for the cxr-pneumonia API: upload an X-ray, show probability, label and Grad-CAM.
// Plain script, no build step. Everything from the server is inserted as text, never as HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const els = {
    dropZone: $("drop-zone"),
    input: $("file-input"),
    fileName: $("file-name"),
    status: $("status"),
    error: $("error"),
    result: $("result"),
    probability: $("probability"),
    label: $("label"),
    modelName: $("model-name"),
    modelInfo: $("model-info"),
    preprocessed: $("preprocessed"),
    heatmap: $("heatmap"),
  };

  // FastAPI errors carry `detail` as a string, or as a list of validation problems.
  function describeDetail(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail
        .map((d) => [Array.isArray(d.loc) ? d.loc.join(".") : "", d.msg].filter(Boolean).join(": "))
        .join("; ");
    }
    return detail === undefined ? "" : JSON.stringify(detail);
  }

  async function errorMessage(response) {
    let detail = "";
    try {
      detail = describeDetail((await response.json()).detail);
    } catch (_) {
      detail = ""; // not JSON: the status line below still says what happened
    }
    const status = `Error ${response.status}${response.statusText ? " " + response.statusText : ""}`;
    return detail ? `${status}: ${detail}` : status;
  }

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = false;
  }

  function clearError() {
    els.error.textContent = "";
    els.error.hidden = true;
  }

  function setBusy(busy) {
    els.status.hidden = !busy;
    els.input.disabled = busy;
    els.dropZone.setAttribute("aria-busy", busy ? "true" : "false");
  }

  function clearResult() {
    els.result.hidden = true;
    els.probability.textContent = "";
    els.label.textContent = "";
    els.modelName.textContent = "";
    els.preprocessed.removeAttribute("src");
    els.heatmap.removeAttribute("src");
  }

  function showResult(data) {
    els.probability.textContent = Number(data.probability).toFixed(3);
    els.label.textContent = `${data.label} (threshold ${Number(data.threshold).toFixed(3)})`;
    els.label.className = data.label === "PNEUMONIA" ? "label-pneumonia" : "label-normal";
    const model = data.model || {};
    els.modelName.textContent = `Model: ${model.name || "unknown"}` +
      (model.trained_at ? `, trained ${model.trained_at}` : "");
    if (data.preprocessed_png_base64) {
      els.preprocessed.src = "data:image/png;base64," + data.preprocessed_png_base64;
    }
    if (data.heatmap_png_base64) {
      els.heatmap.src = "data:image/png;base64," + data.heatmap_png_base64;
    }
    els.result.hidden = false;
  }

  async function analyse(file, note) {
    clearError();
    clearResult();
    const size = file.size < 1024 ? `${file.size} bytes` : `${(file.size / 1024).toFixed(0)} KiB`;
    els.fileName.textContent = `${file.name} (${size})` + (note ? ` — ${note}` : "");
    const form = new FormData();
    form.append("file", file, file.name);
    setBusy(true);
    try {
      const response = await fetch("/v1/predict?heatmap=true", { method: "POST", body: form });
      if (!response.ok) {
        showError(await errorMessage(response));
        return;
      }
      showResult(await response.json());
    } catch (err) {
      showError(`Could not reach the server: ${err && err.message ? err.message : err}`);
    } finally {
      setBusy(false);
      els.input.value = ""; // choosing the same file again fires "change" again
    }
  }

  async function loadModelInfo() {
    try {
      const response = await fetch("/v1/model");
      if (!response.ok) {
        els.modelInfo.textContent = `Model information unavailable (${await errorMessage(response)})`;
        return;
      }
      const info = await response.json();
      const threshold = info.threshold && info.threshold.threshold;
      els.modelInfo.textContent = `Model ${info.name}` +
        (typeof threshold === "number" ? `, operating threshold ${threshold.toFixed(3)}` : "");
    } catch (err) {
      els.modelInfo.textContent = `Model information unavailable: ${err && err.message ? err.message : err}`;
    }
  }

  els.input.addEventListener("change", () => {
    if (els.input.files && els.input.files.length > 0) analyse(els.input.files[0]);
  });

  ["dragenter", "dragover"].forEach((type) =>
    els.dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      els.dropZone.classList.add("dragover");
    })
  );
  ["dragleave", "drop"].forEach((type) =>
    els.dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      els.dropZone.classList.remove("dragover");
    })
  );
  els.dropZone.addEventListener("drop", (event) => {
    const files = event.dataTransfer && event.dataTransfer.files;
    if (!files || files.length === 0) {
      showError("Nothing to analyse: drop a PNG, JPEG or DICOM file.");
      return;
    }
    analyse(files[0], files.length > 1 ? `only the first of ${files.length} dropped files` : "");
  });

  // A file dropped outside the zone would make the browser navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  loadModelInfo();
})();
