"""Deployment formats: files the runtimes people deploy Whisper with load (whisper.cpp, CTranslate2)."""


def refuse_quantized_inputs(asr, target: str, error=None) -> None:
    """Raise `error` (a QuasrError class) when the model quantizes activations: whisper.cpp, CTranslate2 and this
    compressed-tensors export store weight grids only, and a file without the activation scales would run a
    different (better) model than the one quasr measured."""
    from quasr.errors import UsageError

    acts = [n for n, m in asr.model.named_modules() if getattr(m, "act_bits", None)]
    if acts:
        raise (error or UsageError)(
            f"{getattr(asr, 'name', 'the model')}: {len(acts)} modules quantize their input activations (int"
            f"{getattr(dict(asr.model.named_modules())[acts[0]], 'act_bits')}, e.g. {acts[0]}); {target} stores "
            f"weights only. Export the weight-only checkpoint (quantize without --act-bits)")
