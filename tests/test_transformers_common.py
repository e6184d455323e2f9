"""Transformers' own `ModelTesterMixin` and `ConfigTester`, run against every LAPVQA model class.

The testers follow transformers' tests/models/* (bart's standalone decoder, git, vit, detr): tiny configs with
random weights. The common files are fetched for the installed transformers release (see
`transformers_common_tests.py`). Skips are only those transformers itself makes for comparable models, each with
its reason.
"""

import unittest
from unittest.mock import patch

import torch
from transformers_common_tests import import_common

from lapvqa_hf import (
    LapvqaCaptioningConfig,
    LapvqaCaptioningModel,
    LapvqaCocaVisionConfig,
    LapvqaCocaVisionModel,
    LapvqaDetectionConfig,
    LapvqaDetectionModel,
    LapvqaDiffVQAConfig,
    LapvqaDiffVQAModel,
    LapvqaTwoTowerConfig,
    LapvqaTwoTowerModel,
    LapvqaTwoTowerTextConfig,
    LapvqaTwoTowerTextModel,
    LapvqaVisionConfig,
    LapvqaVisionModel,
    LapvqaVQAConfig,
    LapvqaVQAModel,
)

common = import_common("test_modeling_common")
ModelTesterMixin, floats_tensor, ids_tensor = common.ModelTesterMixin, common.floats_tensor, common.ids_tensor
ConfigTester = import_common("test_configuration_common").ConfigTester


class DecoderModelTester:
    """Tiny DiffVQA / VQA heads: a 2-layer decoder over random visual tokens (like bart's standalone decoder)."""

    def __init__(
        self,
        parent,
        two_images: bool,
        batch_size=13,
        seq_length=7,
        vis_dim=24,
        num_visual_tokens=5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=99,
        max_position_embeddings=64,
        is_training=True,
    ):
        self.parent = parent
        self.two_images = two_images
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vis_dim = vis_dim
        self.num_visual_tokens = num_visual_tokens
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.is_training = is_training
        self.special_token_id = vocab_size - 1

    def get_config(self):
        config_class = LapvqaDiffVQAConfig if self.two_images else LapvqaVQAConfig
        return config_class(
            vis_dim=self.vis_dim,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.special_token_id,
            eos_token_id=self.special_token_id,
            pad_token_id=self.special_token_id,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 1)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :2] = 0  # one left-padded row
        inputs_dict = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.two_images:
            inputs_dict["current_image_features"] = floats_tensor(
                [self.batch_size, self.num_visual_tokens, self.vis_dim]
            )
            inputs_dict["prior_image_features"] = floats_tensor(
                [self.batch_size, self.num_visual_tokens + 2, self.vis_dim]
            )
        else:
            inputs_dict["image_features"] = floats_tensor([self.batch_size, self.num_visual_tokens, self.vis_dim])
        return self.get_config(), inputs_dict


class VisionModelTester:
    """A tiny ViT (like transformers' vit tester): 2 layers over a 4 x 4 patch grid."""

    def __init__(
        self,
        parent,
        batch_size=13,
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        is_training=True,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.is_training = is_training
        self.num_patches = (image_size // patch_size) ** 2
        self.seq_length = self.num_patches + 1  # patch tokens + CLS inside the encoder

    def trunk_fields(self) -> dict:
        return dict(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            patch_size=self.patch_size,
            image_size=self.image_size,
            num_channels=self.num_channels,
        )

    def get_config(self):
        return LapvqaVisionConfig(**self.trunk_fields())

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), {"pixel_values": pixel_values}


class CocaVisionModelTester(VisionModelTester):
    """A tiny CoCa image tower (like transformers' CLIP vision tester): the same trunk as above, then 5 pooler queries
    of width 24. Hidden states and attentions are the trunk's."""

    def get_config(self):
        return LapvqaCocaVisionConfig(
            **self.trunk_fields(), projection_dim=24, num_pooler_queries=5, pooler_num_attention_heads=4
        )


class CaptioningModelTester:
    """The tiny ViT above and a 2-layer report decoder (like transformers' git tester)."""

    def __init__(self, parent, batch_size=13, seq_length=7, vocab_size=99, is_training=True):
        self.parent = parent
        self.vision_model_tester = VisionModelTester(parent, batch_size=batch_size)
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.is_training = is_training
        self.special_token_id = vocab_size - 1

    def get_config(self):
        return LapvqaCaptioningConfig(
            vision_config=self.vision_model_tester.get_config().to_dict(),
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=37,
            vocab_size=self.vocab_size,
            max_position_embeddings=64,
            bos_token_id=self.special_token_id,
            eos_token_id=self.special_token_id,
            pad_token_id=self.special_token_id,
        )

    def prepare_config_and_inputs_for_common(self):
        _, vision_inputs = self.vision_model_tester.prepare_config_and_inputs_for_common()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 1)
        inputs_dict = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **vision_inputs}
        return self.get_config(), inputs_dict


class DetectionModelTester:
    """A tiny DETR-style head (like transformers' detr tester): 2 encoder and 2 decoder layers, 6 queries."""

    def __init__(
        self,
        parent,
        batch_size=13,
        vis_dim=24,
        num_visual_tokens=9,
        d_model=32,
        num_layers=2,
        num_attention_heads=4,
        num_queries=6,
        num_labels=5,
        is_training=True,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.vis_dim = vis_dim
        self.d_model = self.hidden_size = d_model
        self.num_hidden_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.num_queries = num_queries
        self.num_labels = num_labels
        self.is_training = is_training
        self.encoder_seq_length = num_visual_tokens
        self.decoder_seq_length = self.seq_length = num_queries

    def get_config(self):
        return LapvqaDetectionConfig(
            vis_dim=self.vis_dim,
            d_model=self.d_model,
            encoder_layers=self.num_hidden_layers,
            decoder_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            num_queries=self.num_queries,
            id2label={i: f"finding {i}" for i in range(self.num_labels)},
        )

    def prepare_config_and_inputs_for_common(self):
        image_features = floats_tensor([self.batch_size, self.encoder_seq_length, self.vis_dim])
        return self.get_config(), {"image_features": image_features}


class GenerativeModelTest(ModelTesterMixin):
    """What the three text-generating models share: labels for the training tests, no `GenerationTesterMixin`."""

    # transformers' `GenerationTesterMixin` lives in tests/generation/, which its sdist does not ship; the same
    # cases (greedy / sample / beam with dict outputs and cache, continuing from a returned cache, assisted
    # decoding, static cache, left padding) are tests/test_generation_common.py.
    all_generative_model_classes = ()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:  # as transformers' causal-LM testers: the inputs are their own targets
            inputs_dict["labels"] = inputs_dict["input_ids"].clone()
        return inputs_dict


class LapvqaDiffVQAModelTest(GenerativeModelTest, unittest.TestCase):
    all_model_classes = (LapvqaDiffVQAModel,)
    additional_model_inputs = ["current_image_features", "prior_image_features"]

    def setUp(self):
        self.model_tester = DecoderModelTester(self, two_images=True)
        self.config_tester = ConfigTester(self, config_class=LapvqaDiffVQAConfig, hidden_size=40)

    def test_config(self):
        self.config_tester.run_common_tests()


class LapvqaVQAModelTest(GenerativeModelTest, unittest.TestCase):
    all_model_classes = (LapvqaVQAModel,)
    additional_model_inputs = ["image_features"]

    def setUp(self):
        self.model_tester = DecoderModelTester(self, two_images=False)
        self.config_tester = ConfigTester(self, config_class=LapvqaVQAConfig, hidden_size=40)

    def test_config(self):
        self.config_tester.run_common_tests()


class LapvqaVisionModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (LapvqaVisionModel,)
    test_resize_embeddings = False  # as ViT: the input embedding is a patch convolution, not a vocabulary

    def setUp(self):
        self.model_tester = VisionModelTester(self)
        # A base model (no head, no loss), as ViTModel: transformers' training tests skip the classes of its
        # MODEL_MAPPING, which lists only its own models.
        base_models = patch.dict(common.MODEL_MAPPING_NAMES, {"lapvqa_vision": "LapvqaVisionModel"})
        base_models.start()
        self.addCleanup(base_models.stop)
        self.config_tester = ConfigTester(
            self, config_class=LapvqaVisionConfig, has_text_modality=False, hidden_size=48
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_get_set_embeddings(self):
        # as transformers' ViT test: the input embedding is the patch convolution, and there is no output embedding
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = LapvqaVisionModel(config)
        self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
        self.assertIsNone(model.get_output_embeddings())


class LapvqaCocaVisionModelTest(LapvqaVisionModelTest):
    all_model_classes = (LapvqaCocaVisionModel,)

    def setUp(self):
        self.model_tester = CocaVisionModelTester(self)
        base_models = patch.dict(common.MODEL_MAPPING_NAMES, {"lapvqa_coca_vision": "LapvqaCocaVisionModel"})
        base_models.start()
        self.addCleanup(base_models.stop)
        self.config_tester = ConfigTester(
            self, config_class=LapvqaCocaVisionConfig, has_text_modality=False, hidden_size=48
        )

    def test_model_get_set_embeddings(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = LapvqaCocaVisionModel(config)
        self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
        self.assertIsNone(model.get_output_embeddings())


class LapvqaCaptioningModelTest(GenerativeModelTest, unittest.TestCase):
    all_model_classes = (LapvqaCaptioningModel,)
    additional_model_inputs = ["pixel_values"]

    def setUp(self):
        self.model_tester = CaptioningModelTester(self)
        self.config_tester = ConfigTester(self, config_class=LapvqaCaptioningConfig, hidden_size=40)

    def test_config(self):
        self.config_tester.run_common_tests()

    if hasattr(ModelTesterMixin, "test_multimodal_outputs_are_returned"):  # transformers >= 5.24

        def test_multimodal_outputs_are_returned(self):
            # transformers runs this check on the generative classes, which the base class above leaves empty
            with patch.object(type(self), "all_generative_model_classes", self.all_model_classes):
                super().test_multimodal_outputs_are_returned()


class LapvqaDetectionModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (LapvqaDetectionModel,)
    is_encoder_decoder = True  # DETR's output layout: encoder_* and decoder_* fields
    test_resize_embeddings = False  # as DETR: no token embeddings
    test_missing_keys = False  # as DETR

    def setUp(self):
        self.model_tester = DetectionModelTester(self)
        self.config_tester = ConfigTester(
            self, config_class=LapvqaDetectionConfig, has_text_modality=False, common_properties=["d_model"]
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:  # as transformers' DETR test: the same few boxes per image, in DETR's label format
            boxes = torch.tensor([[0.3, 0.3, 0.2, 0.1], [0.6, 0.5, 0.3, 0.4], [0.5, 0.7, 0.1, 0.2]])
            inputs_dict["labels"] = [
                {
                    "class_labels": torch.tensor([0, 1, 1], device=common.torch_device),
                    "boxes": boxes.to(common.torch_device),
                }
                for _ in range(self.model_tester.batch_size)
            ]
        return inputs_dict

    @unittest.skip(reason="as DETR: the head has no input embeddings (it takes image features)")
    def test_model_get_set_embeddings(self):
        pass

    def test_attention_outputs(self):
        # as transformers' DETR test, which overrides the common one: an object-detection output holds `logits`
        # and `pred_boxes` besides the encoder-decoder fields, so the common field count does not apply
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        tester = self.model_tester
        for requested_by in ("argument", "config"):
            config.output_attentions = requested_by == "config"
            model = LapvqaDetectionModel(config).eval()
            model.set_attn_implementation("eager")
            extra = {"output_attentions": True} if requested_by == "argument" else {}
            with torch.no_grad():
                outputs = model(**inputs_dict, **extra)
            heads, patches, queries = tester.num_attention_heads, tester.encoder_seq_length, tester.num_queries
            expected = {
                "encoder_attentions": [heads, patches, patches],
                "decoder_attentions": [heads, queries, queries],
                "cross_attentions": [heads, queries, patches],
            }
            for name, shape in expected.items():
                attentions = outputs[name]
                self.assertEqual(len(attentions), tester.num_hidden_layers, name)
                self.assertListEqual(list(attentions[0].shape[-3:]), shape, name)
            self.assertEqual(
                list(outputs.keys()),
                [
                    "logits",
                    "pred_boxes",
                    "last_hidden_state",
                    "decoder_attentions",
                    "cross_attentions",
                    "encoder_last_hidden_state",
                    "encoder_attentions",
                ],
            )


class TwoTowerTextModelTester:
    """A tiny report encoder (like transformers' CLIP text tester): right-padded texts of random lengths."""

    def __init__(self, parent, batch_size=12, seq_length=7, vocab_size=99, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.is_training = is_training
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4

    def get_config(self):
        return LapvqaTwoTowerTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=37,
            max_position_embeddings=64,
            bos_token_id=self.vocab_size - 1,
            eos_token_id=self.vocab_size - 1,
            pad_token_id=self.vocab_size - 1,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 1)
        lengths = torch.arange(self.batch_size) % (self.seq_length - 1) + 2
        attention_mask = (torch.arange(self.seq_length)[None] < lengths[:, None]).long()
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class LapvqaTwoTowerTextModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (LapvqaTwoTowerTextModel,)

    def setUp(self):
        self.model_tester = TwoTowerTextModelTester(self)
        base_models = patch.dict(common.MODEL_MAPPING_NAMES, {"lapvqa_two_tower_text": "LapvqaTwoTowerTextModel"})
        base_models.start()
        self.addCleanup(base_models.stop)
        self.config_tester = ConfigTester(self, config_class=LapvqaTwoTowerTextConfig, hidden_size=40)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="as CLIP's text model: it does not take inputs_embeds")
    def test_inputs_embeds(self):
        pass


class TwoTowerModelTester:
    """The tiny ViT and report encoder above in one space (like transformers' CLIP tester)."""

    def __init__(self, parent, sigmoid: bool = False, is_training=True):
        self.parent = parent
        self.sigmoid = sigmoid
        self.text_model_tester = TwoTowerTextModelTester(parent)
        self.vision_model_tester = VisionModelTester(parent, batch_size=self.text_model_tester.batch_size)
        self.batch_size = self.text_model_tester.batch_size
        self.is_training = is_training

    def get_config(self):
        return LapvqaTwoTowerConfig(
            text_config=self.text_model_tester.get_config().to_dict(),
            vision_config=self.vision_model_tester.get_config().to_dict(),
            projection_dim=24,
            use_logit_bias=self.sigmoid,
        )

    def prepare_config_and_inputs_for_common(self):
        _, text_inputs = self.text_model_tester.prepare_config_and_inputs_for_common()
        _, vision_inputs = self.vision_model_tester.prepare_config_and_inputs_for_common()
        return self.get_config(), {**text_inputs, **vision_inputs, "return_loss": True}


class LapvqaTwoTowerModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (LapvqaTwoTowerModel,)
    additional_model_inputs = ["pixel_values"]  # as CLIP: both towers run in forward
    test_resize_embeddings = False  # as CLIP
    test_attention_outputs = False  # as CLIP: each tower's attentions are tested in its own model test
    _is_composite = True

    def setUp(self):
        self.model_tester = TwoTowerModelTester(self)
        base_models = patch.dict(common.MODEL_MAPPING_NAMES, {"lapvqa_two_tower": "LapvqaTwoTowerModel"})
        base_models.start()
        self.addCleanup(base_models.stop)
        self.config_tester = ConfigTester(
            self, config_class=LapvqaTwoTowerConfig, has_text_modality=False, common_properties=["projection_dim"]
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="as CLIP: hidden states are tested in each tower's model test")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="as CLIP: inputs_embeds is tested in each tower's model test")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="as CLIP: retain_grad is tested in each tower's model test")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip(reason="as CLIP: the two-tower model has no input/output embeddings of its own")
    def test_model_get_set_embeddings(self):
        pass

    def test_logit_scale_and_bias_start_at_their_configured_values(self):
        # what transformers' CLIP test checks of `logit_scale` in its own test_initialization
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for sigmoid in (False, True):
            config.use_logit_bias = sigmoid
            model = LapvqaTwoTowerModel(config)
            self.assertAlmostEqual(model.logit_scale.item(), config.logit_scale_init_value, delta=1e-6)
            self.assertEqual(model.logit_bias is not None, sigmoid)
            if sigmoid:
                self.assertAlmostEqual(model.logit_bias.item(), config.logit_bias_init_value, delta=1e-6)
