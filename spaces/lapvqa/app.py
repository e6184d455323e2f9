"""The LAPVQA Space: chest X-rays and a question in the browser, a tab per task of the package's kind registry.

    python spaces/lapvqa/app.py     # http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT change it)

The work is done by `lapvqa_space` (no gradio there); this file lays out the page.
"""

import logging

import gradio as gr
import pandas as pd
from lapvqa_space import (
    IMAGE_LABELS,
    NOTICE,
    OUTPUT_LABELS,
    TEXT_LABELS,
    Result,
    SpaceError,
    Task,
    collection_models,
    registered_tasks,
    run,
)

from lapvqa_hf.messages import first_line

logger = logging.getLogger("lapvqa-space")


def task_tab(task: Task) -> None:
    """One tab: a model (of the collection, or a folder), the task's files and texts, a run button, and the
    status, text, picture and scores of the run."""
    mode, slug = task.answering.mode, task.slug
    with gr.Tab(task.title, id=slug):
        gr.Markdown(task.about)
        with gr.Row():
            with gr.Column():
                choices = collection_models(task)
                model = gr.Dropdown(choices, value=choices[0] if choices else None, label="Model of the collection",
                                    elem_id=f"{slug}-model")  # fmt: skip
                folder = gr.Textbox(label="Or a model folder (or Hub id): used when filled", elem_id=f"{slug}-path")
                # Files, not gr.Image: 16-bit PNGs and DICOM reach the package's reader as they are.
                inputs = [gr.File(label=f"{IMAGE_LABELS.get(column, column)}: PNG, JPEG (8 or 16 bit) or DICOM",
                                  elem_id=f"{slug}-{column}") for column in task.image_columns]  # fmt: skip
                inputs += [gr.Textbox(label=TEXT_LABELS.get(column, column), value=task.defaults.get(column, ""),
                                      lines=4 if mode == "score" else 1, elem_id=f"{slug}-{column}")
                           for column in task.text_columns]  # fmt: skip
                if mode == "detect":
                    inputs.append(gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Lowest score shown"))
                button = gr.Button("Run", variant="primary", elem_id=f"{slug}-run")
            with gr.Column():
                outputs = [
                    gr.Textbox(label="Status", interactive=False, elem_id=f"{slug}-status"),
                    gr.Textbox(label=OUTPUT_LABELS.get(task.answering.field, "Output"), interactive=False,
                               lines=6 if task.answering.generates_text else 3, elem_id=f"{slug}-text"),
                ]  # fmt: skip
                if task.picture:  # titled in itself: each panel's name over it, the question and answer below
                    outputs.append(gr.Image(type="pil", format="png", interactive=False, show_label=False,
                                            elem_id=f"{slug}-picture"))  # fmt: skip
                if mode == "score":
                    outputs.append(gr.BarPlot(x="finding", y="score", sort="-y", y_lim=[0, 1], label="Scores",
                                              elem_id=f"{slug}-scores"))  # fmt: skip
        button.click(handler(task), [model, folder, *inputs], outputs)


def handler(task: Task):
    """The click handler of a task's tab: (status, text[, picture][, scores]); a failure is the status line."""
    columns = task.image_columns + task.text_columns

    # gradio hands a run its progress bar through a `gr.Progress()` default.
    def answer(model: str | None, folder: str, *values, progress=gr.Progress()) -> list:  # noqa: B008
        texts, threshold = values[: len(columns)], (values[len(columns) :] or (0.5,))[0]  # detection's slider
        result = Result("", None, [], "")
        try:
            result = run(
                task, folder.strip() or model or "", dict(zip(columns, texts, strict=True)), threshold, progress
            )
        except SpaceError as error:
            result.status = f"Error: {error}"
        except Exception as error:  # a bug: its trace goes to the log, one line to the page
            logger.exception("%s failed", task.title)
            result.status = f"Error: unexpected {type(error).__name__}: {first_line(error)}"
        shown = [result.status, result.text]
        if task.picture:
            shown.append(result.picture)
        if task.answering.mode == "score":
            shown.append(pd.DataFrame(result.scores, columns=["finding", "score"]))
        return shown

    return answer


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="LAPVQA: chest X-ray models") as demo:
        gr.Markdown(
            "# LAPVQA: chest X-ray models\nThe [LAPVQA](https://huggingface.co/collections/dmusingu/lapvqa) models "
            "as Transformers models (the `lapvqa-hf` package). Choose a model of the collection (it loads once, on "
            "first use) or type a converted model folder, and upload PNG/JPEG (8 or 16 bit) or DICOM files.\n\n"
            f"> {NOTICE}"
        )
        for task in registered_tasks():
            task_tab(task)
    return demo


demo = build_demo()

if __name__ == "__main__":
    demo.queue().launch()
