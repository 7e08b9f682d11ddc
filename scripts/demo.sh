#!/usr/bin/env bash
# The main pipeline on the bundled sample: inspect -> preprocess -> train -> export -> evaluate -> explain -> predict.
# Called by `make demo`; PY is the venv's python, DEMO_OUT the output folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${DEMO_OUT:-demo_out}
CLI="$PY -m cxr_pneumonia.cli"
SAMPLE=data/sample
SHARED_WEIGHTS=../shared/weights
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

rm -rf "$OUT/run" "$OUT/eval" "$OUT/heatmaps"  # the export lives in run/
mkdir -p "$OUT"

echo "== 1/7 inspect the sample (counts, duplicates, unreadable files, patients across splits)"
$CLI inspect "$SAMPLE" --workers 2

echo "== 2/7 preprocess (CLAHE, largest-contour crop, refined mask, resize) with a before/after panel"
$CLI preprocess "$SAMPLE" "$OUT/preprocessed" --preview "$OUT/preprocessing_preview.png"

echo "== 3/7 train (patient-grouped validation split, cached features, recall-first threshold)"
if [ -f "$SHARED_WEIGHTS/mobilenetv2_imagenet_features_torch.pt" ]; then
  # No internet here: the default backbone's ImageNet weights (MobileNetV2, PyTorch original)
  # come from ../shared and are converted on first use (see README, "Weights").
  export CXR_PNEUMONIA_WEIGHTS_DIR=${CXR_PNEUMONIA_WEIGHTS_DIR:-$(cd "$SHARED_WEIGHTS" && pwd)}
  TRAIN_ARGS=(--weights imagenet)
else
  echo "   (no local ImageNet weights: the seed's ResNet50V2 with random weights, for a quick demo only)"
  TRAIN_ARGS=(--backbone resnet50v2 --weights none --image-size 96)
fi
$CLI train "$SAMPLE/train" --out "$OUT/run" "${TRAIN_ARGS[@]}" --epochs 10 --cache-dir "$OUT/cache"

echo "== 4/7 export to ONNX; bf16 where validation images stay within 0.01 of float32"
$CLI export "$OUT/run"

echo "== 5/7 evaluate on the held-out sample patients (metrics with 95 % CIs, HTML report)"
$CLI evaluate "$OUT/run" "$SAMPLE/test" --out "$OUT/eval" --bootstrap 500

echo "== 6/7 Grad-CAM heatmaps for a few test images"
$CLI explain "$OUT/run" "$SAMPLE/test/PNEUMONIA/person1031_bacteria_2964.jpeg" \
  "$SAMPLE/test/NORMAL/IM-0290-0001.jpeg" --out "$OUT/heatmaps"

echo "== 7/7 predict a folder"
$CLI predict "$OUT/run" "$SAMPLE/test" --out "$OUT/predictions.csv"

echo
echo "Demo finished. Open the report:  $OUT/eval/report.html"
echo "Also: $OUT/preprocessing_preview.png, $OUT/run/plots/training_curves.png, $OUT/heatmaps/, $OUT/predictions.csv"
echo "Serve it:  .venv/bin/cxr-pneumonia serve $OUT/run   (then open http://127.0.0.1:8000/)"
echo "Research use only; not a medical device."
