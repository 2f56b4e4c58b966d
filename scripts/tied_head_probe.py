"""What rounding the tied token embedding / output head to 4 bits costs at the logits, alone (every other weight in
full precision), and whether GPTQ on the head (H from the decoder's final states) recovers it.

    python scripts/tied_head_probe.py [MODEL]      # default whisper-tiny.en

H comes from 64 calib-fit utterances, the measurement from 48 calib-dev ones (teacher forced): cross-entropy of
the labels, KL(FP || quantized) of the next-token distributions, agreement of their argmax, relative weight
error. Grids: ggml's q4_0 (signed-max rule, groups of 32) and q4_1 (asymmetric), with and without the scale
search (`--mse`). The README quotes its output for whisper-tiny.en.
"""
import sys, torch, torch.nn.functional as F
from quasr.models import load_model
from quasr.data import load_source
from quasr.quant.grid import QuantGrid, rtn
from quasr.quant.gptq import gptq
torch.manual_seed(0)
model = sys.argv[1] if len(sys.argv) > 1 else "whisper-tiny.en"
asr = load_model(model)
fit = [u for s in ("asterisk:calib-fit", "tts:calib-fit") for u in load_source(s) if u.seconds < 30][:: 4][:64]
dev = [u for s in ("asterisk:calib-dev", "tts:calib-dev") for u in load_source(s) if u.seconds < 30][:: 2][:48]
head = asr.model.get_output_embeddings()
def states(utts):
    xs, ys = [], []
    cap = []
    h = head.register_forward_pre_hook(lambda m, a: cap.append(a[0].detach()))
    with torch.inference_mode():
        for i in range(0, len(utts), 8):
            b = asr.training_batch(utts[i:i+8])
            cap.clear()
            asr.model(**{k: v for k, v in b.items() if k != "labels"})
            lab = b["labels"]
            m = lab != -100
            xs.append(cap[0][m]); ys.append(lab[m])
    h.remove()
    return torch.cat(xs), torch.cat(ys)
Xf, _ = states(fit)
Xd, Yd = states(dev)
print("fit positions", len(Xf), "dev positions", len(Xd))
W = head.weight.detach().float().clone()
H = Xf.T.double() @ Xf.double()
grid = QuantGrid(4, 32, True, signed_max=True)
cands = {"fp": W, "rtn-q4_0": rtn(W, grid, "head").dequantize(),
         "rtn-q4_0 mse": rtn(W, QuantGrid(4, 32, True, True, signed_max=True), "head").dequantize(),
         "rtn-q4_1 mse": rtn(W, QuantGrid(4, 32, False, True), "head").dequantize()}
for pd in (0.01, 0.1):
    cands[f"gptq-q4_0 d{pd}"] = gptq(W, H.float(), grid, name="head", percdamp=pd)[0].dequantize()
grid1 = QuantGrid(4, 32, False)
cands["rtn-q4_1"] = rtn(W, grid1, "head").dequantize()
cands["gptq-q4_1"] = gptq(W, H.float(), grid1, name="head")[0].dequantize()
lf = Xd @ W.T
pf = F.log_softmax(lf, -1)
for k, Wq in cands.items():
    lq = Xd @ Wq.T
    pq = F.log_softmax(lq, -1)
    kl = (pf.exp() * (pf - pq)).sum(-1).mean().item()
    ce = F.cross_entropy(lq, Yd).item()
    agree = (lq.argmax(-1) == lf.argmax(-1)).float().mean().item()
    werr = ((Wq - W).norm() / W.norm()).item()
    print(f"{k:18s} CE {ce:.4f} KL {kl:.5f} top1-agree {agree:.4f} rel-weight-err {werr:.4f}")
