"""Teacher-forced token cross-entropy on 16 held-in calibration utterances of tiny.en, for W8A8, W4A8 and W4A4
(RTN weights) under each static activation calibrator (where an ESC search starts), and for FP32.

    python scripts/esc_ce_probe.py      # about 10 minutes on 2 cores
"""
import random
import sys
import time

import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from quasr.cli import _calibration
from quasr.models import load_model
from quasr.quantize import QuantConfig, quantize_
from quasr.models.whisper import quiet_transformers
quiet_transformers()
torch.set_num_threads(1)
utts = _calibration(["asterisk:calib", "tts:calib"], 64, 0, False)
held = sorted(random.Random(0).sample(utts, 16), key=lambda u: u.id)
asr = load_model("whisper-tiny.en")
batches = [asr.training_batch(held[i:i+4]) for i in range(0, 16, 4)]
def ce(asr):
    tot = n = 0
    with torch.inference_mode():
        for b in batches:
            out = asr.model(**b); k = int((b["labels"] != -100).sum()); tot += float(out.loss) * k; n += k
    return tot / n
print("fp", ce(asr), flush=True)
for wb, ab in [(8, 8), (4, 8), (4, 4)]:
    for cal in ["max", "percentile", "mse", "entropy", "output-mse"]:
        asr = load_model("whisper-tiny.en")
        cfg = QuantConfig(method="rtn", bits=wb, group_size=128 if wb == 4 else None, sym=wb == 8,
                          act_bits=ab, act_calibrator=cal)
        t = time.time()
        quantize_(asr, cfg, utts, progress=False)
        print(f"W{wb}A{ab}", cal, round(ce(asr), 4), f"{time.time()-t:.0f}s", flush=True)
