"""Each peer tool's quantization of a loaded Whisper (quasr's AsrModel), the way that tool's docs show it.

Runs inside the peer's own venv (bench/peers/setup.sh); every function takes the AsrModel and the calibration
utterances (used only by tools that calibrate) and quantizes `asr.model` in place (or returns a new model).
The schemes quantize the Linears of encoder and decoder and, as each tool does by default, leave the tied
token embedding / output projection in full precision (so sizes count it at FP32).
"""
from __future__ import annotations

import torch

# peer -> scheme -> (bits, group size, description)
SCHEMES = {
    "llmcompressor": {"gptq-w4a16-g128-asym": (4, 128, "GPTQ W4A16, group 128, asymmetric"),
                      "gptq-w4a16-g128-sym": (4, 128, "GPTQ W4A16, group 128, symmetric"),
                      "gptq-w3a16-g128": (3, 128, "GPTQ W3A16, group 128, asymmetric")},
    "bitsandbytes": {"nf4": (4, 64, "NF4, blocks of 64 (Linear4bit)"),
                     "int8": (8, None, "LLM.int8() (Linear8bitLt)")},
    "quanto": {"qint4": (4, 128, "int4 weights (optimum-quanto), group 128"),
               "qint8": (8, None, "int8 weights (optimum-quanto)")},
    "hqq": {"4bit-g64": (4, 64, "HQQ 4-bit, group 64")},
    "torchao": {"int4wo": (4, 128, "int4 weight-only, group 128 (IntxWeightOnlyConfig on CPU)"), "int8wo": (8, None, "int8 weight-only"),
                "int8dq": (8, None, "int8 dynamic activations, int8 weights")},
}


def _linears(model) -> list[str]:
    """Names of the encoder's and decoder's Linears (the output projection, tied to the embedding, excluded)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("proj_out")]


def _set(model, name: str, new) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def quanto(asr, scheme: str, calib) -> None:
    from optimum.quanto import freeze, qint4, qint8, quantize

    w = {"qint4": qint4, "qint8": qint8}[scheme]
    names = set(_linears(asr.model))
    # quanto quantizes every Linear it is given; exclude the tied head as the other tools do
    quantize(asr.model, weights=w, exclude=[n for n, m in asr.model.named_modules()
                                            if isinstance(m, torch.nn.Linear) and n not in names])
    freeze(asr.model)


def hqq(asr, scheme: str, calib) -> None:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=4, group_size=64)
    for n in _linears(asr.model):
        lin = asr.model.get_submodule(n)
        _set(asr.model, n, HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32, device="cpu"))


def torchao(asr, scheme: str, calib) -> None:
    from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                      Int8WeightOnlyConfig, quantize_)

    names = set(_linears(asr.model))
    if scheme == "int4wo":
        try:
            from torchao.dtypes import Int4CPULayout

            cfg = Int4WeightOnlyConfig(group_size=128, layout=Int4CPULayout())
            asr.model.to(torch.bfloat16)  # torchao's int4 CPU kernels take bfloat16 activations
        except ImportError:
            # torchao 0.18's Int4WeightOnlyConfig has no CPU format (its plain one needs the mslk GPU kernels);
            # its CPU route to 4-bit weights is IntxWeightOnlyConfig (int4 codes, one scale per group of 128)
            from torchao.quantization import IntxWeightOnlyConfig
            from torchao.quantization.granularity import PerGroup

            cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128))
    else:
        cfg = {"int8wo": Int8WeightOnlyConfig(), "int8dq": Int8DynamicActivationInt8WeightConfig()}[scheme]
    quantize_(asr.model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn in names)


def bitsandbytes(asr, scheme: str, calib) -> None:
    import bitsandbytes as bnb

    for n in _linears(asr.model):
        lin = asr.model.get_submodule(n)
        if scheme == "nf4":
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    compute_dtype=torch.float32, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      has_fp16_weights=False, threshold=6.0)
            new.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            new.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
        new = new.to("cpu")  # quantizes the weight
        _set(asr.model, n, new)


def llmcompressor(asr, scheme: str, calib) -> None:
    """GPTQ through llm-compressor's oneshot with the basic pipeline (its sequential one fails on Whisper:
    "No statistics available"), on the same calibration utterances as quasr's GPTQ, teacher-forced."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    bits, group, _ = SCHEMES["llmcompressor"][scheme]
    rows = []
    for u in calib:
        b = asr.training_batch([u])
        rows.append({"input_features": b["input_features"][0].tolist(),
                     "decoder_input_ids": b["decoder_input_ids"][0].tolist()})
    ds = Dataset.from_list(rows)

    def collate(batch):
        return {"input_features": torch.tensor(batch[0]["input_features"], dtype=asr.model.dtype)[None],
                "decoder_input_ids": torch.tensor(batch[0]["decoder_input_ids"])[None]}

    config = {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": scheme.endswith("-sym"),
                                                   "strategy": "group", "group_size": group}}
    recipe = GPTQModifier(config_groups={"group_0": config}, ignore=["proj_out"], dampening_frac=0.01)
    oneshot(model=asr.model, dataset=ds, recipe=recipe, data_collator=collate, num_calibration_samples=len(rows),
            max_seq_length=448, pipeline="basic")


QUANTIZE = {"quanto": quanto, "hqq": hqq, "torchao": torchao, "bitsandbytes": bitsandbytes,
            "llmcompressor": llmcompressor}
