"""The upstream implementation (PyPI ``open-flamingo`` + ``open_clip_torch``) built tiny and offline.

Everything is made locally and seeded: a byte-level BPE tokenizer, a Hugging Face GPT-NeoX directory,
an open_clip ViT registered as a model config, and then OpenFlamingo's own factory
(``open_flamingo.create_model_and_transforms``) turns them into a ``Flamingo`` exactly as the UniMP code
does for its backbone. The result is also written as one of our checkpoint directories, so that the
reference model loaded from it can be compared with the upstream model tensor for tensor.

torchvision: open_clip and open_flamingo are imported through ``benchmarks.upstream_model.import_upstream``,
which stands in for torchvision while they are imported (see there); the tests feed both models the same
pixel tensors.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.upstream_model import import_upstream, open_clip_config
from export.catalog import build_catalog, catalog_corpus
from export.modeling.config import VisionConfig
from export.vocab import EOS, train_demo_tokenizer

# -- the tiny upstream model ------------------------------------------------------------------------------

OPEN_CLIP_NAME = "unimp-parity-vit"
VISION = VisionConfig(image_size=224, patch_size=32, width=64, layers=2, heads=2, quick_gelu=True, ln_post_on_tokens=True)
"""OpenAI CLIP-style (QuickGELU) tower; open_clip >= 2.23 applies ln_post to the patch tokens."""
LM: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "rotary_pct": 1.0,
    "rotary_emb_base": 10000,
    "max_position_embeddings": 512,
    "use_parallel_residual": False,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
"""RedPajama-INCITE-shaped GPT-NeoX: sequential residual, full rotary, untied embeddings."""
CROSS_ATTN_EVERY_N_LAYERS = 2
BASE_VOCAB = 320
EXTRA_CORPUS = [
    "Query: comfortable running shoe for trail days. Select from: Selection",
    "User history: What is the related ID to the query based on the history?",
]


def perturb_(module: nn.Module, gen: torch.Generator, *, redraw_matrices: bool = False) -> None:
    """Seeded values that leave nothing trivially cancelling.

    LayerNorm weights 1 + N(0, 0.1) and every bias N(0, 0.1) (initialisers leave 1 and 0); Flamingo's
    tanh gates (initialised to 0, which would switch cross-attention off) uniform in [0.4, 1.0];
    with ``redraw_matrices`` every matrix N(0, 1/fan_in), so that attention is far from uniform and
    activations leave the near-linear range of GELU.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("attn_gate", "ff_gate"):
                p.copy_(0.4 + 0.6 * torch.rand(p.shape, generator=gen))
            elif p.ndim == 1 and leaf == "bias":
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1 and leaf == "weight":  # LayerNorm scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif redraw_matrices and p.ndim == 2:
                p.copy_(p.shape[1] ** -0.5 * torch.randn(p.shape, generator=gen))


def _endofchunk_competes(flamingo: Any, tokenizer: Any, texts: list[str], gen: torch.Generator) -> None:
    """Give ``<|endofchunk|>`` (Flamingo's EOS) the output row of the model's favourite token, scaled by 1.1.

    Resizing leaves it close to the mean row, so a random model would never end a sequence and beam
    search's finished-hypothesis path would go untested; this way hypotheses end at various steps.
    """
    enc = tokenizer(texts, padding="longest", return_tensors="pt")
    blank = torch.zeros(len(texts), 1, 1, 3, VISION.image_size, VISION.image_size)  # no <image>: unused
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Flamingo.forward passes the renamed past_key_values
        logits = flamingo(blank, enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        favourite = int(torch.bincount(logits.argmax(-1)[enc["attention_mask"].bool()]).argmax())
        out = flamingo.lang_encoder.get_output_embeddings().weight
        row = out[favourite]
        out[flamingo.eoc_token_id] = 1.1 * row + 0.1 * row.std() * torch.randn(row.shape, generator=gen)


@dataclass
class Upstream:
    flamingo: Any
    """``open_flamingo.Flamingo`` (eval mode)."""
    tokenizer: Any
    """The Hugging Face tokenizer the factory returned (Flamingo's tokens added), padding on the left."""
    checkpoint: Path
    """The same weights as one of our checkpoint directories."""
    base_vocab: int
    """Size of the base tokenizer, before Flamingo's tokens."""

    @property
    def vocab_size(self) -> int:
        """Rows of the upstream embeddings: the base vocabulary plus ``<|endofchunk|>``, ``<image>``, ``<PAD>``."""
        return int(self.flamingo.lang_encoder.get_input_embeddings().weight.shape[0])


def build_upstream(root: Path, seed: int = 0, num_items: int = 5) -> Upstream:
    """Build the tiny upstream Flamingo and write it under ``root/checkpoint`` in our directory format."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    open_flamingo, open_clip = import_upstream()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # open_clip's and transformers' initialisers use the global generator
    ckpt = root / "checkpoint"
    records = build_catalog(ckpt / "catalog", num_items, seed=seed, image_size=32)

    # The language model's own directory, as a release ships it: base vocabulary only.
    lm_dir = ckpt / "lm"
    base = train_demo_tokenizer([*catalog_corpus(records), *EXTRA_CORPUS], BASE_VOCAB)
    base_vocab = base.get_vocab_size(with_added_tokens=True)
    PreTrainedTokenizerFast(tokenizer_object=base, bos_token=EOS, eos_token=EOS).save_pretrained(lm_dir)
    lm = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=base_vocab, **LM))
    perturb_(lm, gen, redraw_matrices=True)
    lm.save_pretrained(lm_dir)

    # open_clip finds the tower by model name, like the released "ViT-L-14" (no pretrained weights).
    configs = root / "open_clip_configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / f"{OPEN_CLIP_NAME}.json").write_text(json.dumps(open_clip_config(VISION)))
    open_clip.add_model_config(configs)

    flamingo, _, tokenizer = open_flamingo.create_model_and_transforms(
        clip_vision_encoder_path=OPEN_CLIP_NAME,
        clip_vision_encoder_pretrained=None,
        lang_encoder_path=str(lm_dir),
        tokenizer_path=str(lm_dir),
        cross_attn_every_n_layers=CROSS_ATTN_EVERY_N_LAYERS,
        use_local_files=True,
        decoder_layers_attr_name="gpt_neox.layers",
    )
    tokenizer.padding_side = "left"
    # The vision path gets O(1) weights so that its details (QuickGELU, ln_post) show in the logits; the
    # cross-attention blocks keep their initialisation (with gates open), which leaves the text in charge.
    perturb_(flamingo.vision_encoder, gen, redraw_matrices=True)
    perturb_(flamingo.perceiver, gen, redraw_matrices=True)
    perturb_(flamingo.lang_encoder.gated_cross_attn_layers, gen)
    flamingo.eval()
    _endofchunk_competes(flamingo, tokenizer, [*catalog_corpus(records), *EXTRA_CORPUS], gen)

    # Our checkpoint directory: a whole open_clip CLIP (text tower included), the LM directory above,
    # and OpenFlamingo's state dict, which holds every tensor under all its aliases.
    clip = open_clip.create_model(OPEN_CLIP_NAME)
    clip.visual.load_state_dict(flamingo.vision_encoder.state_dict())
    torch.save(clip.state_dict(), ckpt / "vision.pt")
    torch.save(flamingo.state_dict(), ckpt / "checkpoint.pt")
    v = VISION
    meta = {
        "name": "upstream-parity",
        "cross_attn_every_n_layers": CROSS_ATTN_EVERY_N_LAYERS,
        "eos_token": EOS,
        "vision": {
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "width": v.width,
            "layers": v.layers,
            "heads": v.heads,
            "mlp_ratio": v.mlp_ratio,
            "quick_gelu": v.quick_gelu,
            "ln_post_on_tokens": v.ln_post_on_tokens,
        },
    }
    (ckpt / "unimp.json").write_text(json.dumps(meta, indent=2))
    return Upstream(flamingo=flamingo, tokenizer=tokenizer, checkpoint=ckpt, base_vocab=base_vocab)
