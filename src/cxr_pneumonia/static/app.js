// Web page for the cxr-pneumonia API: upload an X-ray, show probability, label and Grad-CAM.
// An image the input check rejects gets its own message (no probability, no label); an accepted
// but unusual one, or one classified with the check off, gets a visible note.
// A server started with --token-file serves this page only to a browser that gave the token
// (HTTP Basic: the browser asks once, before the page loads, and sends it with every call the
// page makes), so the page itself handles no token; a 401 means the server's token changed.
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
    gateOff: $("gate-off"),
    rejection: $("rejection"),
    rejectionReason: $("rejection-reason"),
    domainNote: $("domain-note"),
    scores: $("scores"),
    probability: $("probability"),
    label: $("label"),
    modelName: $("model-name"),
    modelInfo: $("model-info"),
    preprocessed: $("preprocessed"),
    preprocessedFigure: $("preprocessed-figure"),
    heatmap: $("heatmap"),
    heatmapFigure: $("heatmap-figure"),
    heatmapNote: $("heatmap-note"),
  };
  const TOKEN_CHANGED = "The server did not accept this page's access token: reload the page to enter it again.";

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
    els.rejection.hidden = true;
    els.rejectionReason.textContent = "";
    els.domainNote.hidden = true;
    els.domainNote.textContent = "";
    els.probability.textContent = "";
    els.label.textContent = "";
    els.label.className = "";
    els.modelName.textContent = "";
    els.preprocessed.removeAttribute("src");
    els.heatmap.removeAttribute("src");
  }

  function showImage(img, figure, base64) {
    if (base64) img.src = "data:image/png;base64," + base64;
    figure.hidden = !base64;
  }

  // The note beside a classified image: accepted but unusual, or rejected and classified anyway.
  function domainNote(data) {
    if (data.status === "rejected") {
      return "Input check off: this image does not look like the frontal chest X-rays the model " +
        `was trained on (${data.reason || "rejected"}). The result below is unreliable.`;
    }
    if (data.unusual) {
      return "Unusual image: unlike most of the training images or patients " +
        `(${data.reason || "unusual"}). Treat the result with extra caution.`;
    }
    return "";
  }

  function showResult(data) {
    const classified = typeof data.probability === "number";
    if (classified) {
      els.probability.textContent = Number(data.probability).toFixed(3);
      els.label.textContent = `${data.label} (threshold ${Number(data.threshold).toFixed(3)})`;
      els.label.className = data.label === "PNEUMONIA" ? "label-pneumonia" : "label-normal";
    } else {
      els.rejectionReason.textContent = data.reason ? `Input check: ${data.reason}.` : "";
    }
    els.rejection.hidden = classified;
    els.scores.hidden = !classified;
    const note = classified ? domainNote(data) : "";
    els.domainNote.textContent = note;
    els.domainNote.hidden = !note;
    const model = data.model || {};
    els.modelName.textContent = `Model: ${model.name || "unknown"}` +
      (model.trained_at ? `, trained ${model.trained_at}` : "");
    showImage(els.preprocessed, els.preprocessedFigure, data.preprocessed_png_base64);
    showImage(els.heatmap, els.heatmapFigure, data.heatmap_png_base64);
    els.heatmapNote.hidden = !data.heatmap_png_base64;
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
      const query = "heatmap=true" + (els.gateOff.checked ? "&gate=false" : "");
      const response = await fetch(`/v1/predict?${query}`, { method: "POST", body: form });
      if (response.status === 401) {
        showError(TOKEN_CHANGED);
        return;
      }
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
      if (response.status === 401) {
        els.modelInfo.textContent = TOKEN_CHANGED;
        return;
      }
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
