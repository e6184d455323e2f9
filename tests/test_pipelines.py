"""`transformers.pipeline(model=folder)` from chest X-ray images to answers, reports and boxes, for every converted
head kind: the same tokens as the manual path (the encoder recipe's image preparation -> the frozen encoder ->
`head.generate`), batched or not, and as remote code in a Python without `lapvqa_hf`."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import run_without_lapvqa_hf
from lapvqa_hf.convert.original import CaptioningModel, DetectionHead, DiffVQAHead, VQAHead, randomize_
from PIL import Image
from test_image_processing import write_dicom
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, pipeline

from lapvqa_hf import LapvqaImageProcessor
from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.models.encoders import EncoderRecipe, load_encoder, load_encoder_image_processor, patch_tokens
from lapvqa_hf.tokenization import build_gpt2_tokenizer, encode_questions

TINY_HEAD = dict(d_model=32, nhead=4, num_layers=1, dim_feedforward=48, max_len=40)
QUESTIONS = ["what has changed compared to the reference image?", "is there an effusion?", "where?", "why?"]


@pytest.fixture(scope="module")
def xrays(tmp_path_factory) -> list:
    """The kinds of input a user has: an 8-bit PNG path, a 16-bit PNG path, a PIL image, an array, a DICOM path."""
    folder = tmp_path_factory.mktemp("xrays")
    generator = np.random.default_rng(0)
    png8, png16 = folder / "cxr.png", folder / "cxr16.png"
    Image.fromarray(generator.integers(0, 255, (40, 36), dtype=np.uint8)).save(png8)
    Image.fromarray(generator.integers(200, 3000, (50, 44), dtype=np.uint16)).save(png16)
    pil = Image.fromarray(generator.integers(0, 255, (30, 30, 3), dtype=np.uint8))
    array = generator.integers(0, 255, (33, 29), dtype=np.uint8)
    dicom = write_dicom(folder / "cxr.dcm", generator.integers(0, 4096, (48, 40)), "MONOCHROME1", window=(2048, 4096))
    return [str(png8), str(png16), pil, array, str(dicom)]


def tiny_clip_folder(folder):
    """A random CLIP vision tower of CLIP ViT-L/14's width and input size (1024, 224 px) with 56 px patches (4 x 4
    tokens), with CLIP's own image processor: the frozen encoder, in its own folder."""
    config = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=224,
        patch_size=56,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224).save_pretrained(folder)  # as CLIP's own
    return folder


@pytest.fixture(scope="module")
def clip_encoder(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("tiny-clip"))


def convert(kind: str, head: torch.nn.Module, folder, encoder_folder, *extra) -> str:
    checkpoint = folder / f"{kind}.pt"
    torch.save(randomize_(head, seed=3).state_dict(), checkpoint)
    output = folder / f"lapvqa-{kind}"
    arguments = ["--encoder", "clip-vit-l14", "--encoder-checkpoint", str(encoder_folder), *extra]
    assert lapvqa(["convert", kind, str(checkpoint), *arguments, "--output", str(output)]) == 0
    return str(output)


@pytest.fixture(scope="module")
def diffvqa_folder(tmp_path_factory, clip_encoder):
    head = DiffVQAHead(vis_dim=1024, **TINY_HEAD)
    return convert("diffvqa", head, tmp_path_factory.mktemp("diffvqa"), clip_encoder, "--num-heads", "4")


@pytest.fixture(scope="module")
def vqa_folder(tmp_path_factory, clip_encoder):
    head = VQAHead(vis_dim=1024, **TINY_HEAD)
    return convert("vqa", head, tmp_path_factory.mktemp("vqa"), clip_encoder, "--num-heads", "4")


@pytest.fixture(scope="module")
def detection_folder(tmp_path_factory, clip_encoder):
    head = DetectionHead(vis_dim=1024, d_model=32, dim_feedforward=48)
    return convert("detection", head, tmp_path_factory.mktemp("detection"), clip_encoder)


def manual_tokens(folder: str, images: list) -> torch.Tensor:
    """The encoder's patch tokens as a user would compute them by hand from the head's recorded recipe: X-rays read
    as 8-bit RGB, then the encoder's own image processor, then the encoder."""
    recipe = EncoderRecipe(**json.loads(open(os.path.join(folder, "config.json")).read())["feature_recipe"])
    encoder, processor = load_encoder(recipe), load_encoder_image_processor(recipe)
    if json.loads(open(os.path.join(folder, "config.json")).read())["model_type"] == "lapvqa_detection":
        processor = LapvqaImageProcessor.from_pretrained(folder)  # detection: the folder's own (boxes map back)
        pixels = processor(images)["pixel_values"]
    else:
        pixels = LapvqaImageProcessor().encoder_pixel_values(images, processor)
    with torch.no_grad():
        return patch_tokens(recipe, encoder, pixels)


def manual_answers(model, images: dict, questions: list[str], **generate) -> list[str]:
    tokenizer = build_gpt2_tokenizer()
    prompts = encode_questions(tokenizer, questions)
    generated = model.generate(**prompts, **images, max_new_tokens=6, do_sample=False, **generate)
    return [
        a.strip() for a in tokenizer.batch_decode(generated[:, prompts.input_ids.shape[1] :], skip_special_tokens=True)
    ]


def test_diffvqa_pipeline_answers_as_the_manual_path_one_by_one_and_batched(diffvqa_folder, xrays):
    pipe = pipeline(model=diffvqa_folder, trust_remote_code=True)
    rows = [  # prior and current: 8-bit PNG / 16-bit PNG, 16-bit / PIL, PIL / array, array / DICOM
        {"prior_image": xrays[i], "current_image": xrays[i + 1], "question": q} for i, q in enumerate(QUESTIONS)
    ]
    expected = []
    for row in rows:
        ref = manual_tokens(diffvqa_folder, [row["prior_image"]])
        curr = manual_tokens(diffvqa_folder, [row["current_image"]])
        expected += manual_answers(
            pipe.model, {"prior_image_features": ref, "current_image_features": curr}, [row["question"]]
        )
    assert pipe(rows[0], max_new_tokens=6) == {"answer": expected[0]}
    assert pipe(rows, max_new_tokens=6) == [{"answer": a} for a in expected]
    assert pipe(rows, max_new_tokens=6, batch_size=3) == [{"answer": a} for a in expected]  # left-padded batch
    beams = pipe(rows[0], max_new_tokens=6, num_beams=3, num_return_sequences=2)
    assert len(beams) == 2 and all(set(b) == {"answer"} for b in beams)


def test_the_pipelines_batch_methods_answer_as_the_pipeline_does(diffvqa_folder, detection_folder, xrays):
    pipe = pipeline(model=diffvqa_folder, trust_remote_code=True)
    rows = [{"prior_image": xrays[i], "current_image": xrays[i + 1], "question": q} for i, q in enumerate(QUESTIONS)]
    encoded = {
        name: pipe.encode(torch.cat([pipe.prepare_image(row[column])[0] for row in rows]))
        for column, name in (("prior_image", "prior_image_features"), ("current_image", "current_image_features"))
    }
    prompts = [pipe.prompt_ids(row["question"]) for row in rows]
    generated = pipe.generate_texts(prompts, encoded, max_new_tokens=6, do_sample=False)
    assert generated.texts == [answer["answer"] for answer in pipe(rows, max_new_tokens=6)]
    width = max(map(len, prompts))
    assert generated.prompt_attention_mask.tolist() == [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    assert generated.sequences.shape[1] <= width + 6
    with pytest.raises(ValueError, match="A question must be a non-empty string"):
        pipe.prompt_ids("  ")

    detector = pipeline(model=detection_folder, trust_remote_code=True)
    pixels, size = detector.prepare_image(xrays[0])
    features = detector.encode(pixels)
    (boxes,) = detector.detect(features, [size], threshold=0.0)
    assert boxes == detector(xrays[0], threshold=0.0)
    (nothing,) = detector.detect(torch.full_like(features, float("nan")), [size])
    assert nothing is None, "non-finite outputs are no boxes, never silently"


def test_vqa_pipeline_answers_as_the_manual_path(vqa_folder, xrays):
    pipe = pipeline(model=vqa_folder, trust_remote_code=True)
    rows = [{"image": image, "question": q} for image, q in zip(xrays[1:], QUESTIONS, strict=True)]
    expected = [
        manual_answers(pipe.model, {"image_features": manual_tokens(vqa_folder, [row["image"]])}, [row["question"]])[0]
        for row in rows
    ]
    assert pipe(rows, max_new_tokens=6, batch_size=2) == [{"answer": a} for a in expected]


def tiny_encoder_folder(name: str, folder):
    """A random encoder of each family at its recipe's width and input size, with its own image processor, saved
    as a local folder (few, large patches: 16 tokens)."""
    from test_features import tiny_florence2
    from transformers import (
        Owlv2ImageProcessor,
        Owlv2VisionConfig,
        Owlv2VisionModel,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
        ViTImageProcessor,
        ViTMAEConfig,
        ViTMAEModel,
    )
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from lapvqa_hf import LapvqaVisionConfig, LapvqaVisionModel

    layer = dict(intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(0)
    if name == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(hidden_size=1152, image_size=384, patch_size=96, **layer))
        processor = SiglipImageProcessor(size={"height": 384, "width": 384})
    elif name == "owlv2":
        model = Owlv2VisionModel(Owlv2VisionConfig(hidden_size=1024, image_size=960, patch_size=240, **layer))
        processor = Owlv2ImageProcessor(size={"height": 960, "width": 960})
    elif name == "florence2":
        model = tiny_florence2()
        processor = CLIPImageProcessor(size={"height": 768, "width": 768}, do_center_crop=False,
                                       image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)  # fmt: skip
    elif name == "mae-vit-l16":
        config = ViTMAEConfig(hidden_size=1024, image_size=224, patch_size=56, decoder_num_hidden_layers=1,
                              decoder_hidden_size=32, decoder_intermediate_size=32, **layer)  # fmt: skip
        model, processor = ViTMAEModel(config), ViTImageProcessor(size={"height": 224, "width": 224})
    elif name == "coca":  # CoCa's image tower, as `lapvqa convert coca-encoder` writes it from open_clip weights
        from test_coca_encoder import converted_tiny_coca

        return converted_tiny_coca(folder)
    else:  # the collection's own ViT, as `lapvqa convert vision-encoder` writes it
        model = LapvqaVisionModel(LapvqaVisionConfig(hidden_size=1024, image_size=224, patch_size=56, **layer))
        processor = LapvqaImageProcessor(size={"height": 224, "width": 224})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ["siglip", "owlv2", "florence2", "coca", "mae-vit-l16", "lapvqa-vit-l14"])
def test_every_encoder_family_feeds_its_head_through_the_pipeline(name, tmp_path, xrays):
    from lapvqa_hf.models.encoders import ENCODER_WIDTHS

    encoder_folder = tiny_encoder_folder(name, tmp_path / name)
    torch.save(randomize_(VQAHead(vis_dim=ENCODER_WIDTHS[name], **TINY_HEAD), seed=3).state_dict(), tmp_path / "h.pt")
    folder = tmp_path / "vqa"
    arguments = ["--encoder", name, "--encoder-checkpoint", str(encoder_folder), "--num-heads", "4"]
    assert lapvqa(["convert", "vqa", str(tmp_path / "h.pt"), *arguments, "--output", str(folder)]) == 0
    pipe = pipeline(model=str(folder), trust_remote_code=True)
    row = {"image": xrays[4], "question": QUESTIONS[1]}  # the DICOM
    tokens = manual_tokens(str(folder), [row["image"]])
    assert tokens.shape[-1] == ENCODER_WIDTHS[name]
    expected = manual_answers(pipe.model, {"image_features": tokens}, [row["question"]])
    assert pipe(row, max_new_tokens=6) == {"answer": expected[0]}


def test_detection_pipeline_gives_boxes_in_the_original_images_pixels(detection_folder, xrays):
    pipe = pipeline(model=detection_folder, trust_remote_code=True)
    found = pipe(xrays[1], threshold=0.0)  # the 16-bit PNG, 50 x 44
    model, processor = pipe.model, pipe.image_processor
    with torch.no_grad():
        outputs = model(image_features=manual_tokens(detection_folder, [xrays[1]]))
    (expected,) = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(50, 44)])
    assert [d["score"] for d in found] == pytest.approx(expected["scores"].tolist())
    assert [d["label"] for d in found] == [model.config.id2label[int(i)] for i in expected["labels"]]
    assert all(0 <= d["box"]["xmin"] <= d["box"]["xmax"] <= 44 and 0 <= d["box"]["ymax"] <= 50 for d in found)
    assert len(pipe(xrays[0], threshold=0.0, top_k=3)) == 3


def test_captioning_pipeline_writes_the_models_report(tmp_path, xrays):
    upstream = randomize_(
        CaptioningModel(img_size=28, patch_size=14, vision_width=64, vision_depth=1, vision_heads=4, **TINY_HEAD),
        seed=5,
    )
    torch.save(upstream.state_dict(), tmp_path / "model_best.pt")
    folder = tmp_path / "captioning"
    heads = ["--num-heads", "4", "--vision-num-heads", "4"]
    assert lapvqa(["convert", "captioning", str(tmp_path / "model_best.pt"), *heads, "--output", str(folder)]) == 0
    pipe = pipeline(model=str(folder), trust_remote_code=True)
    (report,) = pipe(xrays[0], max_new_tokens=6)
    tokenizer = build_gpt2_tokenizer()
    pixel_values = pipe.image_processor(xrays[0])["pixel_values"]
    generated = pipe.model.generate(input_ids=torch.tensor([[50256]]), pixel_values=pixel_values, max_new_tokens=6)
    assert report == {"generated_text": tokenizer.decode(generated[0, 1:], skip_special_tokens=True).strip()}


def test_bad_pipeline_inputs_say_what_is_expected(vqa_folder):
    pipe = pipeline(model=vqa_folder, trust_remote_code=True)
    with pytest.raises(ValueError, match=r"The VQA pipeline takes a dict with \['image', 'question'\]"):
        pipe({"picture": "x.png", "question": "why?"})
    with pytest.raises(ValueError, match="A question must be a non-empty string"):
        pipe({"image": np.zeros((8, 8), dtype=np.uint8), "question": " "})


REMOTE_PIPELINE = """
import json
import transformers

pipe = transformers.pipeline(model=sys.argv[1], trust_remote_code=True)
assert type(pipe).__module__.startswith("transformers_modules"), type(pipe).__module__
print(json.dumps(pipe(json.loads(sys.argv[2]), max_new_tokens=6)))
"""


def test_the_remote_code_pipeline_answers_without_the_package(diffvqa_folder, xrays, tmp_path):
    row = {"prior_image": xrays[0], "current_image": xrays[1], "question": QUESTIONS[0]}
    expected = pipeline(model=diffvqa_folder, trust_remote_code=True)(row, max_new_tokens=6)
    result = run_without_lapvqa_hf(REMOTE_PIPELINE, [diffvqa_folder, json.dumps(row)], tmp_path)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_a_coca_head_answers_from_images_with_transformers_alone(tmp_path, xrays):
    """The collection's headline model: a CoCa DiffVQA head and CoCa's converted image tower, both remote code."""
    from test_coca_encoder import converted_tiny_coca

    encoder_folder = converted_tiny_coca(tmp_path / "lapvqa-coca-vit-l14")
    torch.save(randomize_(DiffVQAHead(vis_dim=768, **TINY_HEAD), seed=3).state_dict(), tmp_path / "coca_best.pt")
    folder = str(tmp_path / "lapvqa-diffvqa-coca")
    arguments = ["--encoder", "coca", "--encoder-checkpoint", str(encoder_folder), "--num-heads", "4"]
    assert lapvqa(["convert", "diffvqa", str(tmp_path / "coca_best.pt"), *arguments, "--output", folder]) == 0
    row = {"prior_image": xrays[4], "current_image": xrays[1], "question": QUESTIONS[0]}  # DICOM, 16-bit PNG
    curr, ref = manual_tokens(folder, [row["current_image"]]), manual_tokens(folder, [row["prior_image"]])
    expected = manual_answers(pipeline(model=folder, trust_remote_code=True).model, {"current_image_features": curr, "prior_image_features": ref},
                              [row["question"]])  # fmt: skip
    result = run_without_lapvqa_hf(REMOTE_PIPELINE, [folder, json.dumps(row)], tmp_path)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"answer": expected[0]}


def test_plain_greedy_decoding_on_a_gpu_goes_through_the_device_side_loop_with_the_same_answers(
    diffvqa_folder, xrays, monkeypatch
):
    """On a CUDA device the pipelines decode plain greedy requests with `greedy_generate`; here the choice is forced on
    the CPU, where the answers must be those of `generate()`, batched and one by one."""
    import lapvqa_hf.models.pipeline_lapvqa as pipelines

    pipe = pipeline(task="lapvqa-diffvqa", model=diffvqa_folder, pipeline_class=pipelines.LapvqaDiffVQAPipeline)
    rows = [{"prior_image": xrays[i], "current_image": xrays[i + 1], "question": q} for i, q in enumerate(QUESTIONS)]
    expected = pipe(rows, max_new_tokens=8, batch_size=3)
    calls = []
    monkeypatch.setattr(pipelines, "fast_greedy_applies", lambda device, kwargs: calls.append(kwargs) or True)
    assert pipe(rows, max_new_tokens=8, batch_size=3) == expected
    assert pipe(rows[0], max_new_tokens=8) == expected[0] and calls
