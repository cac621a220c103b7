"""SR INT8 Lab: the Gradio app, a thin shell over `sr/` (layout and event wiring only).

    python app.py [--host 0.0.0.0] [--port 7860] [--share]
"""
from __future__ import annotations

import argparse
import logging
import os
import threading

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import numpy as np
import pandas as pd

from sr import jobs
from sr.calibrate import Method, ensure_calibration_images
from sr.compare import MODES, PRESETS, available_models, compare, roi_strip
from sr.data import ImageLoadError, load_image
from sr.diagnose import FIXES, apply_fix, diagnose, range_chart
from sr.models import read_metadata

log = logging.getLogger("app")
HEAVY = "heavy"  # one concurrency id for all CPU-heavy work: parallel users queue instead of oversubscribing
PANELS = ("Original", "PyTorch FP32", "INT8 model A (ReLU)", "INT8 model B (Clipped ReLU)")
MAX_UPLOAD = "25mb"


def _examples() -> list[str]:
    images = ensure_calibration_images()
    picks = [p for p in images if p.name.endswith("-0.png")][:4]
    return [str(p) for p in picks]


def _check_image(image) -> None:
    if image is None:
        raise gr.Error("Upload an image first (drag and drop, file picker or paste).")


def _read_calibration_uploads(files) -> list[np.ndarray] | None:
    if not files:
        return None
    images = []
    for file in files:
        path = file if isinstance(file, str) else getattr(file, "name", str(file))
        try:
            images.append(load_image(path))
        except (ImageLoadError, FileNotFoundError) as error:
            gr.Warning(f"Skipped a calibration image: {error}")
    if not images:
        raise gr.Error("None of the uploaded calibration images could be read.")
    return images


def _metrics_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    return frame.round(4).replace([np.inf], "∞")


def load_calibration_uploads(files):
    """Decode the user's calibration images once, into this session's state."""
    images = _read_calibration_uploads(files)
    if images:
        gr.Info(f"{len(images)} calibration image(s) ready; choose 'my uploads' to use them.")
    return images


def run_compare(image, model_a="teacher", model_b="xlsr-clip-kd", method="entropy", samples=100, scheme="tensorrt",
                mode=MODES[0], display="bicubic", calib_source="calib_data/", calib_images=None,
                progress=gr.Progress()):
    """The main comparison (also the `compare` API endpoint): four images, metrics, range chart."""
    _check_image(image)
    try:
        calibration = calib_images if calib_source == "my uploads" else None
        if calib_source == "my uploads" and not calibration:
            raise gr.Error("Choose 'my uploads' only after uploading calibration images.")
        result = compare(image, model_a, model_b, method, int(samples), scheme, mode, display, calibration,
                         progress=lambda fraction, message: progress(fraction, desc=message))
    except gr.Error:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise gr.Error(str(error)) from None
    except Exception as error:  # never show a traceback to the user; keep it in the server log
        log.exception("comparison failed")
        raise gr.Error(f"The comparison failed: {type(error).__name__}: {error}") from None
    for notice in result.notices:
        gr.Warning(notice)
    state = {"panels": [result.original, result.fp32, result.int8_a, result.int8_b],
             "calibrations": result.calibrations}
    chart = range_chart(result.calibrations[0], result.calibrations[1])
    return (result.original, result.fp32, result.int8_a, result.int8_b, _metrics_frame(result.metrics), chart,
            state)


def run_slider(state, left, right):
    if not state:
        return None
    return (state["panels"][PANELS.index(left)], state["panels"][PANELS.index(right)])


def run_roi(state, center_x, center_y, size):
    if not state:
        return None
    return roi_strip(state["panels"], center_x, center_y, int(size))


def apply_preset(preset):
    model_a, model_b = PRESETS[preset]
    return gr.update(value=model_a), gr.update(value=model_b)


def refresh_models():
    models = available_models()
    return gr.update(choices=models), gr.update(choices=models)


def run_diagnose(image, model_a, model_b, which, mode, method, samples, scheme, progress=gr.Progress()):
    _check_image(image)
    model = model_a if which == "model A" else model_b
    try:
        report = diagnose(model, method, int(samples), scheme, images_for_eval=[image], mode=mode,
                          progress=lambda f, m: progress(f, desc=m))
    except (ValueError, FileNotFoundError) as error:
        raise gr.Error(str(error)) from None
    except Exception as error:
        log.exception("diagnosis failed")
        raise gr.Error(f"The diagnosis failed: {type(error).__name__}: {error}") from None
    ranking = pd.DataFrame(report.ranking_rows()).round(4)
    culprit = report.ranking[0].tensor if report.ranking else None
    return (ranking, report.histogram_figure(culprit), report.summary(),
            gr.update(choices=[r.tensor for r in report.ranking], value=culprit), report)


def run_fix(image, report, tensor, fix, mode, progress=gr.Progress()):
    _check_image(image)
    if report is None:
        raise gr.Error("Run the diagnosis first.")
    try:
        outcome = apply_fix(report, tensor, fix, image, mode, progress=lambda f, m: progress(f, desc=m))
    except (ValueError, FileNotFoundError) as error:
        raise gr.Error(str(error)) from None
    except Exception as error:
        log.exception("fix failed")
        raise gr.Error(f"The fix failed: {type(error).__name__}: {error}") from None
    return outcome.before, outcome.after, pd.DataFrame(outcome.rows).round(4)


def start_training(steps, activation, use_teacher, alpha):
    """Stream the job's loss and validation PSNR until it ends; one job at a time for the whole server."""
    try:
        job = jobs.start(int(steps), activation, bool(use_teacher), float(alpha))
    except RuntimeError as error:
        raise gr.Error(str(error)) from None
    for snapshot in job.stream():
        frame = pd.DataFrame(snapshot.history or [{"step": 0, "loss": None}])
        yield snapshot.status, frame[["step", "loss"]].dropna(), frame.dropna(subset=["val_psnr"])[["step", "val_psnr"]] \
            if "val_psnr" in frame else pd.DataFrame({"step": [], "val_psnr": []})


def cancel_training():
    return jobs.cancel()


def build_demo() -> gr.Blocks:
    models = available_models()
    with gr.Blocks(title="SR INT8 Lab") as demo:
        gr.Markdown("# SR INT8 Lab\nWhat INT8 post-training quantization does to a super-resolution network, "
                    "side by side: FP32 and INT8 outputs of a ReLU model and a Clipped-ReLU model (Ayazoglu, "
                    "CVPRW 2021), with metrics, recalibration and a diagnosis of the tensor behind the damage.")
        state = gr.State(None)
        with gr.Tab("Compare"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(label="Input image", type="filepath", sources=["upload", "clipboard"],
                                     elem_id="input-image")
                    gr.Examples(_examples(), inputs=image)
                    mode = gr.Radio(list(MODES), value=MODES[0], label="Mode")
                    preset = gr.Radio(list(PRESETS), value="the story", label="Preset")
                    model_a = gr.Dropdown(models, value=PRESETS["the story"][0], label="Model A (ReLU output)")
                    model_b = gr.Dropdown(models, value=PRESETS["the story"][1], label="Model B (Clipped ReLU)")
                with gr.Column(scale=1):
                    method = gr.Dropdown([m.value for m in Method], value="entropy", label="Calibration method")
                    samples = gr.Radio([10, 100, 1000], value=100, label="Calibration samples")
                    scheme = gr.Radio(["tensorrt", "cpu"], value="tensorrt", label="INT8 scheme")
                    calib_source = gr.Radio(["calib_data/", "my uploads"], value="calib_data/",
                                            label="Calibration images")
                    calib_files = gr.File(label="My calibration images", file_count="multiple",
                                          file_types=["image"])
                    display = gr.Radio(["bicubic", "nearest"], value="bicubic", label="Original shown with")
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    recalibrate = gr.Button("Recalibrate", elem_id="recalibrate")
            with gr.Row():
                panels = [gr.Image(label=name, format="png", type="numpy", interactive=False,
                                   buttons=["download", "fullscreen"], elem_id=f"panel-{i}")
                          for i, name in enumerate(PANELS)]
            metrics = gr.Dataframe(label="Metrics (Y-PSNR/SSIM with the scale shaved from each border)",
                                   elem_id="metrics", interactive=False)
            with gr.Row():
                left = gr.Dropdown(list(PANELS), value=PANELS[1], label="Slider left")
                right = gr.Dropdown(list(PANELS), value=PANELS[2], label="Slider right")
            slider = gr.ImageSlider(label="Before / after", format="png", type="numpy")
            with gr.Row():
                center_x = gr.Slider(0, 1, 0.5, label="Zoom centre x")
                center_y = gr.Slider(0, 1, 0.5, label="Zoom centre y")
                size = gr.Slider(16, 256, 64, step=8, label="Zoom crop (px)")
            roi = gr.Image(label="Zoom: the same crop of all four panels", format="png", type="numpy",
                           interactive=False)
            chart = gr.Plot(label="Activation ranges: observed vs chosen, clipped share")

            calib_images = gr.State(None)
            calib_files.upload(load_calibration_uploads, calib_files, calib_images, api_name=False)
            inputs = [image, model_a, model_b, method, samples, scheme, mode, display, calib_source, calib_images]
            outputs = [*panels, metrics, chart, state]
            for button in (run, recalibrate):
                event = button.click(run_compare, inputs, outputs, api_name="compare" if button is run else False,
                                     concurrency_id=HEAVY, concurrency_limit=1)
                event.then(run_slider, [state, left, right], slider).then(
                    run_roi, [state, center_x, center_y, size], roi)
            preset.change(apply_preset, preset, [model_a, model_b], api_name=False)
            for control in (left, right):
                control.change(run_slider, [state, left, right], slider, api_name=False)
            for control in (center_x, center_y, size):
                control.release(run_roi, [state, center_x, center_y, size], roi, api_name=False)

        with gr.Tab("Why is it dull?"):
            gr.Markdown("Quantize one tensor at a time (and all but one) to find the tensor whose range does "
                        "the damage, then fix it in one click.")
            with gr.Row():
                which = gr.Radio(["model A", "model B"], value="model A", label="Diagnose")
                diagnose_button = gr.Button("Diagnose", variant="primary", elem_id="diagnose")
            summary = gr.Markdown()
            ranking = gr.Dataframe(label="Tensors ranked by the damage their quantization alone does",
                                   interactive=False)
            histogram = gr.Plot(label="Histogram of the culprit with its chosen range")
            report_state = gr.State(None)
            with gr.Row():
                tensor = gr.Dropdown([], label="Tensor to fix")
                fix = gr.Dropdown(list(FIXES), value=list(FIXES)[0], label="Fix")
                fix_button = gr.Button("Apply fix", elem_id="apply-fix")
            with gr.Row():
                before = gr.Image(label="Before (INT8)", format="png", type="numpy", interactive=False)
                after = gr.Image(label="After the fix (INT8)", format="png", type="numpy", interactive=False)
            fix_metrics = gr.Dataframe(label="Before / after", interactive=False)
            diagnose_button.click(run_diagnose, [image, model_a, model_b, which, mode, method, samples, scheme],
                                  [ranking, histogram, summary, tensor, report_state], concurrency_id=HEAVY,
                                  concurrency_limit=1, api_name="diagnose")
            fix_button.click(run_fix, [image, report_state, tensor, fix, mode], [before, after, fix_metrics],
                             concurrency_id=HEAVY, concurrency_limit=1, api_name=False)

        with gr.Tab("Train"):
            gr.Markdown("A short XLSR training or distillation run on the CPU (needs the training images at "
                        "`../shared/data/`, or set `SR_TRAIN_DIRS`). One job at a time; the result appears in "
                        "the model lists.")
            with gr.Row():
                steps = gr.Number(300, precision=0, label="Steps", minimum=10, maximum=100_000)
                activation = gr.Radio(["relu", "clipped_relu", "linear"], value="clipped_relu",
                                      label="Final activation")
                use_teacher = gr.Checkbox(True, label="Distil from the teacher")
                alpha = gr.Slider(0, 1, 0.5, label="alpha (ground-truth weight)")
            with gr.Row():
                train_button = gr.Button("Start", variant="primary")
                cancel_button = gr.Button("Cancel")
            status = gr.Markdown()
            loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss")
            val_plot = gr.LinePlot(x="step", y="val_psnr", title="Validation PSNR (dB)")
            train_event = train_button.click(start_training, [steps, activation, use_teacher, alpha],
                                             [status, loss_plot, val_plot], api_name=False)
            train_event.then(refresh_models, None, [model_a, model_b], api_name=False)
            cancel_button.click(cancel_training, None, status, api_name=False)
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description="SR INT8 Lab")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="a temporary public gradio.live link")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    build_demo().queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port,
                                                          share=args.share, max_file_size=MAX_UPLOAD,
                                                          show_error=False)


if __name__ == "__main__":
    main()
