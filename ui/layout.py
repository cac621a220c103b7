"""The page: the gr.Blocks of the Compare, diagnosis and training tabs, their controls and outputs, and every event
wired to its handler (with its concurrency lane); the page's CSS."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from sr.lab.compare import available_models
from sr.lab.fixes import Fix
from sr.quant.calibdata import ensure_calibration_images
from sr.quant.calibrate import Method
from sr.quant.quantspec import Scheme
from sr.quant.recipe import Refinement
from ui import jobs
from ui.comparison import (apply_preset, load_calibration_uploads, new_seed, panel_labels, refresh_models, relabel_a,
                           relabel_b, run_compare, run_difference, run_roi, run_slider, zoom_at)
from ui.handlers import (build_bundle, cancel_diagnosis, cancel_training, load_onnx_model, make_ready_for, offer_result,
                         run_diagnose, run_fix, start_qat, start_training)
from ui.server import HEAVY, HEAVY_SLOTS, PROBES, SESSION_STATE_SECONDS, issue_owner, untouched_image
from ui.words import (CALIB_SOURCES, DIFFERENCE_KINDS, DIFFERENCES, FIX_LABELS, METHOD_HELP, MODES, PANELS, PRESETS,
                      REFERENCE_TARGET, TARGET_DIFFERENCES, TARGETS, _label, done_note)

HEADER_CHAR_PX, HEADER_PADDING_PX = 10, 48  # a header word's characters (bold monospace) and a cell's padding + menu
WIDE_COLUMN_PX = 220  # a column of names (tensors, models, engines)


def _examples() -> list[str]:
    images = ensure_calibration_images()
    return [str(p) for p in images if p.name.endswith("-0.png")][:4]


def _compare_controls(models: list[str]) -> dict:
    first = next(iter(PRESETS))
    model_a, model_b = PRESETS[first]["models"]
    with gr.Row():
        with gr.Column(scale=1):
            examples = _examples()
            controls = {"image": untouched_image(value=examples[0] if examples else None, label="Input image",
                                                 sources=["upload", "clipboard"], elem_id="input-image")}
            gr.Examples(examples, inputs=controls["image"])
            with gr.Row():  # within the first screen (1400x900), beside the image they act on
                controls["run"] = gr.Button("Run", variant="primary", elem_id="run")
                controls["recalibrate"] = gr.Button("Recalibrate (new sample)", elem_id="recalibrate")
            controls["mode"] = gr.Radio(list(MODES), value="Upscale my image", label="Mode")
            controls["preset"] = gr.Radio(list(PRESETS), value=first, label="Preset")
            controls["preset_note"] = gr.Markdown()
            controls["model_a"] = gr.Dropdown(models, value=model_a, label=f"Model A ({_label(model_a)})",
                                              elem_id="model-a")
            controls["model_b"] = gr.Dropdown(models, value=model_b, label=f"Model B ({_label(model_b)})",
                                              elem_id="model-b")
            controls.update(_your_model())
        with gr.Column(scale=1):
            controls["method"] = gr.Dropdown([m.value for m in Method], value="entropy", label="Calibration method",
                                             info=METHOD_HELP)
            controls["samples"] = gr.Radio([10, 100, 1000], value=100, label="Calibration samples")
            controls["scheme"] = gr.Radio([s.value for s in Scheme], value="tensorrt", label="INT8 scheme",
                                          info="tensorrt: Q/DQ where NVIDIA ModelOpt puts them (checked against ModelOpt; "
                                               "attention, gates and ConvTranspose may differ); npu: LiteRT's 8-bit "
                                               "specification, what phone NPUs run (every tensor INT8 with a zero "
                                               "point, INT32 biases; npu-per-tensor: one scale per weight tensor); "
                                               "npu-symmetric: symmetric-only accelerators; cpu: UINT8, ONNX "
                                               "Runtime's x86 path")
            controls["target"] = gr.Radio(list(TARGETS), value=REFERENCE_TARGET, label="INT8 panels run on",
                                          elem_id="target",
                                          info="the lab's reference, or a target's own integer arithmetic on the same "
                                               "INT8 model (npu / npu-per-tensor scheme): Qualcomm's Hexagon NPU as "
                                               "onnxruntime-qnn simulates it, or the bundle's .tflite in LiteRT; "
                                               "each is checked against the reference first")
            controls["refine"] = gr.CheckboxGroup(
                [r.value for r in Refinement if r is not Refinement.RANGE_SEARCH], value=[],
                label="Post-training refinements (both models)", elem_id="refine",
                info="centred-io: the image's 256 levels exactly on the INT8 grid; equalize: per-channel scales moved "
                     "between layers so small channels keep their precision; adaround: learned weight rounding; "
                     "bias-correction: the INT8 mean shift removed. FP32 panels then show the refined model (the "
                     "same function for the first two). The README's table says what each is worth.")
            controls["calib_source"] = gr.Radio(list(CALIB_SOURCES), value=CALIB_SOURCES[0], label="Calibration images")
            controls["calib_files"] = gr.File(label="My calibration images", file_count="multiple", file_types=["image"])
            controls["gain"] = gr.Slider(0.1, 2.0, 1.0, step=0.05, label="Calibration brightness gain (experiment)",
                                         info="Scale the calibration images' brightness: below 1 reproduces a "
                                              "calibration set darker than what the model sees at run time.")
            controls["seed"] = gr.Number(0, precision=0, label="Calibration seed")
            controls["display"] = gr.Radio(["bicubic", "nearest"], value="bicubic", label="Original shown with")
            controls.update(_deploy())
    return controls


def _your_model() -> dict:
    with gr.Accordion("Your own ONNX model", open=False):
        parts = {"onnx": gr.File(label="Drop an ONNX super-resolution model", file_types=[".onnx"],
                                 elem_id="onnx-upload")}
        examples = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.onnx"))
        if examples:  # small models of other families (examples/README.md says how each was made)
            gr.Examples([[str(path)] for path in examples], inputs=parts["onnx"], elem_id="onnx-examples",
                        label="Or try an example model (examples/README.md says what each is)")
        parts["contract"] = gr.Markdown(elem_id="contract")  # (the deploy panel serves it too: model A)
        with gr.Row():
            parts["layout"] = gr.Dropdown(["auto", "nchw", "nhwc"], value="auto", label="Layout")
            parts["color"] = gr.Dropdown(["auto", "rgb", "y"], value="auto", label="Colour")
            parts["value_range"] = gr.Dropdown(["auto", "1", "255"], value="auto", label="Value range")
            parts["scale"] = gr.Dropdown(["auto", "2", "3", "4"], value="auto", label="Scale")
        parts["pre_upsampled"] = gr.Checkbox(False, label="Pre-upsampled input (VDSR-style)")
    return parts


def _deploy() -> dict:
    """Model A's deployment: its INT8 bundle as set, or the INT8-ready search (any model A, shipped or yours)."""
    with gr.Accordion("Deploy model A: INT8 bundle, INT8-ready search", open=True):
        parts = {"bundle_button": gr.Button("Download INT8 model (model A, these calibration settings)",
                                            elem_id="bundle-button")}
        with gr.Row():
            parts["ready_target"] = gr.Number(0.05, label="Target loss vs FP32 (dB)", minimum=0, maximum=10)
            parts["ready_minutes"] = gr.Slider(1, 4, value=2, step=0.5, label="Time budget (minutes)")
        parts["ready_button"] = gr.Button("Make model A INT8-ready (range methods, refinements, mixed precision"
                                          + (", QAT" if jobs.POLICY.enabled else "") + ")", elem_id="ready-button")
        parts["ready_report"] = gr.Markdown(elem_id="ready-report")
        parts["bundle"] = gr.File(label="INT8 deployment bundle", elem_id="bundle")
    return parts


def _table(label: str, headers: list[str], elem_id: str, wide: tuple[int, ...] = ()) -> gr.Dataframe:
    """A read-only table whose headers break between words only: each column at least as wide as its header's
    longest word (Gradio's own sizing squeezed "brightness" into "brightn ess" on a narrow page); the `wide`
    columns (names, engines) get room for their values; a page narrower than the table scrolls it sideways."""
    widths = [max(HEADER_CHAR_PX * max(len(word) for word in header.split()) + HEADER_PADDING_PX,
                  WIDE_COLUMN_PX if index in wide else 0) for index, header in enumerate(headers)]
    return gr.Dataframe(label=label, headers=headers, column_widths=[f"{w}px" for w in widths], wrap=True,
                        interactive=False, elem_id=elem_id, elem_classes=["sr-table"])


def _compare_outputs() -> dict:
    with gr.Column(visible=False) as results:  # shown when there is something to show
        # what the page is doing: "Running..." from the click, "Done in ..." once every view is drawn (the
        # browser test waits on it too)
        status = gr.Markdown(elem_id="run-status")
        with gr.Row():
            panels = [gr.Image(label=name, format="png", type="numpy", interactive=False, elem_classes=["sr-panel"],
                               buttons=["download", "fullscreen"], elem_id=f"panel-{i}") for i, name in enumerate(PANELS)]
        outputs = {"panels": panels, "coverage": gr.Markdown(label="Calibration coverage", elem_id="coverage"),
                   "metrics": _table("Metrics (Y-PSNR/SSIM with the scale shaved from each border)",
                                     ["output", "engine", "PSNR vs FP32 (dB)", "SSIM vs FP32", "brightness vs FP32",
                                      "ΔE2000", "time on this CPU (ms)"], elem_id="metrics", wide=(0, 1))}
        gr.Markdown("PSNR and SSIM: of each output against the FP32 output of the same model (Y channel; higher is "
                    "closer). Brightness: mean luma of the output over FP32's (below 1 is darker). ΔE2000: mean "
                    "colour difference, CIEDE2000 (below 1 is invisible to most people). Time: wall time of that "
                    "output on this server's CPU, in milliseconds.", elem_id="metrics-help")
        outputs["difference"] = _difference_view()
        with gr.Row():
            outputs["left"] = gr.Dropdown(list(PANELS), value=PANELS[1], label="Slider left")
            outputs["right"] = gr.Dropdown(list(PANELS), value=PANELS[2], label="Slider right")
        outputs["slider"] = gr.ImageSlider(label="Before / after", format="png", type="numpy")
        with gr.Row():
            outputs["center_x"] = gr.Slider(0, 1, 0.5, label="Zoom centre x")
            outputs["center_y"] = gr.Slider(0, 1, 0.5, label="Zoom centre y")
            outputs["size"] = gr.Slider(16, 256, 64, step=8, label="Zoom crop (px)")
        outputs["roi"] = gr.Image(label="Zoom: the same crop of every panel (and of the difference view)", format="png",
                                  type="numpy", interactive=False, elem_id="zoom")
        outputs["chart"] = gr.Plot(label="Activation ranges: observed vs chosen, clipped share")
        outputs["state"] = gr.State(None, time_to_live=SESSION_STATE_SECONDS)
    outputs["results"], outputs["status"] = results, status
    return outputs


def _difference_view() -> dict:
    gr.Markdown("### Difference view\nWhere INT8 departs from FP32, amplified. Click any panel to zoom every "
                "panel, and this view, at that point.")
    with gr.Row():
        view = {"pair": gr.Dropdown([*DIFFERENCES, *TARGET_DIFFERENCES], value=next(iter(DIFFERENCES)),
                                    label="Compare"),
                "kind": gr.Radio(list(DIFFERENCE_KINDS), value=next(iter(DIFFERENCE_KINDS)), label="Show"),
                "gain": gr.Slider(1, 128, 16, step=1, label="Gain (x)")}
    view["image"] = gr.Image(label="Amplified difference", format="png", type="numpy", interactive=False,
                             elem_id="difference", buttons=["download", "fullscreen"])
    return view


def _wire_compare(c: dict, o: dict) -> None:
    calib_images = gr.State(None, time_to_live=SESSION_STATE_SECONDS)
    c["calib_files"].upload(load_calibration_uploads, c["calib_files"], calib_images, api_name=False)
    history = gr.State(None)
    inputs = [c["image"], c["model_a"], c["model_b"], c["method"], c["samples"], c["scheme"], c["mode"], c["display"],
              c["calib_source"], calib_images, c["gain"], c["seed"], history, c["refine"], c["target"]]
    outputs = [*o["panels"], o["metrics"], o["coverage"], o["chart"], o["state"], history]
    d = o["difference"]
    zoom = [o["state"], o["center_x"], o["center_y"], o["size"], d["pair"], d["kind"], d["gain"]]
    difference = [o["state"], d["pair"], d["kind"], d["gain"]]
    reveal = lambda: (gr.update(visible=True), "Running...")  # noqa: E731
    run = c["run"].click(reveal, None, [o["results"], o["status"]], api_name=False, queue=False).then(
        run_compare, inputs, outputs, api_name="compare", concurrency_id=HEAVY, concurrency_limit=HEAVY_SLOTS)
    again = c["recalibrate"].click(new_seed, None, c["seed"], api_name=False).then(
        reveal, None, [o["results"], o["status"]], api_name=False).then(
        run_compare, inputs, outputs, api_name=False, concurrency_id=HEAVY, concurrency_limit=HEAVY_SLOTS)
    uploads = c["uploads"]
    # change, not upload: a click on an example model sets the file too
    c["onnx"].change(load_onnx_model, [c["onnx"], c["layout"], c["color"], c["value_range"], c["pre_upsampled"],
                                       c["scale"], c["model_b"], uploads],
                     [c["model_a"], c["model_b"], c["contract"], uploads], api_name=False,
                     concurrency_id="probe", concurrency_limit=PROBES)
    c["bundle_button"].click(build_bundle, [c["image"], c["model_a"], c["method"], c["samples"], c["gain"], c["seed"],
                                            c["mode"]], c["bundle"], api_name=False, concurrency_id=HEAVY,
                             concurrency_limit=HEAVY_SLOTS)
    ready = c["ready_button"].click(
        make_ready_for, [c["model_a"], c["samples"], c["scheme"], c["ready_target"], c["ready_minutes"], uploads,
                         c["model_b"], c["target"]],
        [c["ready_report"], c["bundle"], c["model_a"], c["model_b"], uploads, c["method"], c["gain"], c["seed"],
         c["refine"], c["calib_source"]], api_name=False, concurrency_id=HEAVY, concurrency_limit=HEAVY_SLOTS)
    shown = ready.success(reveal, None, [o["results"], o["status"]], api_name=False).then(  # the chosen model shown
        run_compare, inputs, outputs, api_name=False, concurrency_id=HEAVY, concurrency_limit=HEAVY_SLOTS)
    _after_comparison([run, again, shown], o, d, zoom, difference)
    c["preset"].change(apply_preset, c["preset"], [c["model_a"], c["model_b"], c["method"], c["gain"], c["preset_note"]],
                       api_name=False)
    c["model_a"].input(relabel_a, c["model_a"], c["model_a"], api_name=False)
    c["model_b"].input(relabel_b, c["model_b"], c["model_b"], api_name=False)
    for control in (o["left"], o["right"]):
        control.change(run_slider, [o["state"], o["left"], o["right"]], o["slider"], api_name=False)
    for control in (o["center_x"], o["center_y"], o["size"]):
        # input: dragging and typing in the number box alike; always_last drops the stale ones
        control.input(run_roi, zoom, o["roi"], api_name=False, trigger_mode="always_last")


def _after_comparison(events: list, o: dict, d: dict, zoom: list, difference: list) -> None:
    """What follows every comparison: the panels' names, the slider, the difference view, the zoom, the done line."""
    for event in events:
        event.success(panel_labels, o["state"], o["panels"], api_name=False).then(
            run_slider, [o["state"], o["left"], o["right"]], o["slider"], api_name=False).then(
            run_difference, difference, d["image"], api_name=False).then(run_roi, zoom, o["roi"], api_name=False).then(
            done_note, o["state"], o["status"], api_name=False)
        event.failure(lambda: "Stopped: the message above says why.", None, o["status"], api_name=False)
    for control in (d["pair"], d["kind"], d["gain"]):
        control.change(run_difference, difference, d["image"], api_name=False).then(
            run_roi, zoom, o["roi"], api_name=False)
    for panel in [*o["panels"], d["image"]]:
        panel.select(zoom_at, [o["state"], o["size"], d["pair"], d["kind"], d["gain"]],
                     [o["center_x"], o["center_y"], o["roi"]], api_name=False)


def _diagnose_tab(c: dict) -> None:
    gr.Markdown("Quantize one tensor at a time (and all but one) to find the tensor whose range does the damage, "
                "then fix it in one click.")
    with gr.Row():
        which = gr.Radio(["model A", "model B"], value="model A", label="Diagnose")
        button = gr.Button("Diagnose", variant="primary", elem_id="diagnose")
        cancel = gr.Button("Cancel", elem_id="cancel-diagnosis")
    summary = gr.Markdown(label="Diagnosis summary")
    ranking = _table("Tensors ranked by how far their quantization alone moves the output from FP32",
                     ["tensor", "op", "PSNR vs FP32, alone (dB)", "drop vs truth, alone (dB)",
                      "recovery if kept float (dB)", "brightness alone", "SQNR (dB)", "clipped %", "clipped energy %"],
                     elem_id="ranking", wide=(0,))
    histogram = gr.Plot(label="Histogram of the culprit with its chosen range")
    report_state = gr.State(None, time_to_live=SESSION_STATE_SECONDS)
    with gr.Row():
        tensor = gr.Dropdown([], label="Tensor to fix")
        fix = gr.Dropdown(list(FIX_LABELS.values()), value=FIX_LABELS[Fix.RANGE_MINMAX], label="Fix")
        fix_button = gr.Button("Apply fix", elem_id="apply-fix")
    with gr.Row():
        before = gr.Image(label="Before (INT8)", format="png", type="numpy", interactive=False)
        after = gr.Image(label="After the fix (INT8)", format="png", type="numpy", interactive=False)
    fix_metrics = _table("Before / after", ["INT8 model", "PSNR (dB)", "brightness vs FP32"], elem_id="fix-metrics",
                         wide=(0,))
    button.click(run_diagnose, [c["image"], c["model_a"], c["model_b"], which, c["mode"], c["method"], c["samples"],
                                c["scheme"], c["gain"], c["seed"], c["owner"], c["target"]],
                 [ranking, histogram, summary, tensor, report_state, fix], concurrency_id=HEAVY,
                 concurrency_limit=HEAVY_SLOTS, api_name="diagnose")
    cancel.click(cancel_diagnosis, c["owner"], None, api_name=False)
    fix_button.click(run_fix, [c["image"], report_state, tensor, fix, c["mode"]], [before, after, fix_metrics],
                     concurrency_id=HEAVY, concurrency_limit=HEAVY_SLOTS, api_name=False)


def _train_tab(c: dict) -> None:
    if not jobs.POLICY.enabled:
        gr.Markdown("Training is off on this deployment: a public Space would let anyone spend its CPU. Run the "
                    "lab yourself with `python app.py --allow-training` to train or distil XLSR models here.")
    gr.Markdown(f"A short XLSR training or distillation run on the CPU (needs the training images at "
                f"`../shared/data/`, or set `SR_TRAIN_DIRS`), at most {jobs.POLICY.max_steps} steps. Jobs run "
                "one at a time in the order asked; only this browser (its tabs share one owner token) can cancel its "
                "job; the result appears in the "
                "model lists.")
    with gr.Row():
        steps = gr.Number(300, precision=0, label="Steps", minimum=1, maximum=jobs.POLICY.max_steps)
        activation = gr.Radio(["relu", "clipped_relu", "linear"], value="clipped_relu", label="Final activation")
        use_teacher = gr.Checkbox(True, label="Distil from the teacher")
        kd_mode = gr.Dropdown([("output (match its output)", "output"),
                               ("upcycled (also zoomed-in/out inputs and flips, DUKD)", "upcycled"),
                               ("feature (also its features, through an adapter)", "feature")],
                              value="output", label="Distillation mode")
        alpha = gr.Slider(0, 1, 0.5, label="alpha (ground-truth weight)")
    with gr.Row():
        on = jobs.POLICY.enabled  # off: the controls are shown disabled, with the reason above them
        train_button = gr.Button("Start" if on else "Start (training is off here)", variant="primary", interactive=on)
        cancel_button = gr.Button("Cancel", interactive=on)
    status = gr.Markdown()
    loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss")
    val_plot = gr.LinePlot(x="step", y="val_psnr", title="Validation PSNR (dB)")
    event = train_button.click(start_training, [steps, activation, use_teacher, alpha, kd_mode, c["owner"]],
                               [status, loss_plot, val_plot],
                               api_name=False)
    event.then(refresh_models, None, [c["model_a"], c["model_b"]], api_name=False)
    cancel_button.click(cancel_training, c["owner"], status, api_name=False)
    _qat_section(c)


def _qat_section(c: dict) -> None:
    gr.Markdown("### Fine-tune model A for INT8 (QAT)\nQuantization-aware fine-tuning of **model A** (Compare tab), "
                "your uploaded "
                "ONNX model included: the INT8 model itself, TensorRT scheme, is trained against the images and the "
                "original FP32 model, its ranges learned; the lab's own networks also get centred I/O (every 8-bit "
                "level exactly an INT8 value). The result joins the model lists as model A, and its learned "
                "ranges go into the deployment bundle. Same limits and queue as training.")
    with gr.Row():
        steps = gr.Number(300, precision=0, label="Fine-tuning steps", minimum=1, maximum=jobs.POLICY.max_steps)
        guided = gr.Checkbox(False, label="Guided by the teacher (the shipped 940k-parameter FP32 model; several "
                             "times slower per step; see the README for what it is worth)")
        on = jobs.POLICY.enabled
        start = gr.Button("Fine-tune model A for INT8" if on else "Fine-tune model A for INT8 (fine-tuning is off here)",
                          variant="primary", elem_id="qat-button", interactive=on)
        cancel = gr.Button("Cancel", interactive=on)
    status = gr.Markdown(elem_id="qat-status")
    plot = gr.LinePlot(x="step", y="val_psnr", title="Fake-quantized validation PSNR (dB, in training)")
    result = gr.State(None)
    event = start.click(start_qat, [c["model_a"], steps, guided, c["owner"]], [status, plot, result], api_name=False)
    event.then(offer_result, [result, c["uploads"], c["model_b"]], [c["model_a"], c["model_b"], c["uploads"]],
               api_name=False)
    cancel.click(cancel_training, c["owner"], status, api_name=False)


def build_demo() -> gr.Blocks:
    """The app's Blocks: Compare, diagnosis and training tabs."""
    # Gradio's own temp files (uploads, outputs) older than an hour are deleted every hour
    with gr.Blocks(title="SR INT8 Lab", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# SR INT8 Lab\nWhat INT8 post-training quantization does to a super-resolution network, side "
                    "by side: FP32 and INT8 outputs of two models (by default a ReLU and a Clipped-ReLU XLSR, "
                    "Ayazoglu, CVPRW 2021), with metrics, a check that the calibration covers your image, "
                    "recalibration and a diagnosis of the tensor behind the damage. Pick an example or upload an "
                    "image, then press **Run**.")
        with gr.Tab("Compare"):
            controls = _compare_controls(available_models())
            controls["uploads"] = gr.State([])  # this tab's ONNX models (uploaded, or made INT8-ready)
            # this browser's owner token (jobs and cancellations belong to it), issued when the page loads
            controls["owner"] = gr.BrowserState(None, storage_key="sr-int8-lab-owner")
            _wire_compare(controls, _compare_outputs())
        with gr.Tab("Why is it dull?"):
            _diagnose_tab(controls)
        with gr.Tab("Train"):
            _train_tab(controls)
        demo.load(issue_owner, controls["owner"], controls["owner"], api_name=False)
    return demo


# panel titles wrap beside the panel's buttons instead of running under them (Gradio floats a label over the image)
CSS = """
.sr-panel [data-testid="block-label"] { white-space: normal; max-width: calc(100% - 72px); line-height: 1.3; }
.sr-table th .header { word-break: normal !important; overflow-wrap: normal !important; hyphens: none; }
"""
