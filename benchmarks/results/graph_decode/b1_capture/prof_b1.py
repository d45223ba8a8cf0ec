# Where does a batch-1 question's time go on the H200 (NQ dev, default model, bundled adapter)?
import cProfile, json, os, pstats, sys, time
import torch
from gsa_rag import GistEngine

engine = GistEngine.from_pretrained()
rows = [json.loads(l) for l, _ in zip(open(os.environ["GSA_RAG_DATA"] + "/nq/dev.jsonl"), range(40))]
def one(r):
    return engine.generate(r["question"], [p["text"] for p in r["passages"]], max_new_tokens=16)
for graphs in (True, False):
    engine.cuda_graphs = None if graphs else False
    for r in rows[:5]:
        one(r)
torch.cuda.synchronize()
answers = {}
for graphs in (True, False, True, False):
    engine.cuda_graphs = None if graphs else False
    t = time.perf_counter(); out = [one(r) for r in rows[10:25]]; torch.cuda.synchronize()
    answers.setdefault(graphs, out)
    print("graphs" if graphs else "eager", "per question s", round((time.perf_counter() - t) / 15, 4),
          "reserved MB", torch.cuda.memory_reserved() // 2**20)
print("same answers", sum(a == b for a, b in zip(answers[True], answers[False])), "of 15")
engine.cuda_graphs = None
pr = cProfile.Profile(); pr.enable(); [one(r) for r in rows[25:40]]; torch.cuda.synchronize(); pr.disable()
st = pstats.Stats(pr, stream=sys.stdout)
st.sort_stats("cumulative").print_stats(45)
