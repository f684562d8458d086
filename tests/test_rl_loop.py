"""The pieces wired together on a toy policy: verifier -> length reward -> OPMD, partial rollouts.

A bigram "LM" (logits = table[previous token]) over EOS + letters A..I answers by emitting letters;
the multiple-choice verifier reads the last letter. k1.5 iteration structure: the current weights
are the reference pi_i, the optimizer is reset every iteration. Mean reward must rise well above
the uniform policy's 1/9.
"""

import ast
import doctest
import importlib
import pkgutil
from pathlib import Path

import torch

import moonforge.stages.rl as rl
from moonforge.stages.rl.opmd import opmd_loss, sequence_logprobs
from moonforge.stages.rl.replay import ReplayBuffer, RolloutConfig, rollout_step, training_tensors
from moonforge.stages.rl.rewards import LengthPenaltyConfig, total_rewards
from moonforge.stages.rl.verifiers import VerifyStats, score

V, EOS, BOS = 11, 0, 10
LETTERS = "ABCDEFGHI"  # token t in 1..9 -> LETTERS[t - 1]


class Bigram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(V, V)
        torch.nn.init.zeros_(self.table.weight)

    def forward(self, ids_BL):
        logits = self.table(ids_BL)
        logits[..., BOS] = -1e9  # never emit BOS
        return logits


def make_generate(model, gen):
    @torch.no_grad()
    def generate(contexts, max_new):
        outs, table = [], torch.log_softmax(model(torch.arange(V)), -1)  # (prev, next) log-probs
        for ctx in contexts:
            prev, new, lps = ctx[-1], [], []
            while len(new) < max_new:
                logp = table[prev]
                tok = int(torch.multinomial(logp.exp(), 1, generator=gen))
                new.append(tok)
                lps.append(float(logp[tok]))
                prev = tok
                if tok == EOS:
                    outs.append((new, lps, "stop"))
                    break
            else:
                outs.append((new, lps, "length"))
        return outs

    return generate


def test_opmd_improves_reward_on_a_toy_task():
    torch.manual_seed(0)
    model, gen = Bigram(), torch.Generator().manual_seed(0)
    generate = make_generate(model, gen)
    roll = RolloutConfig(segment_budget=3, max_total_tokens=8, max_segment_age=None)
    lp_cfg = LengthPenaltyConfig(weight=0.2, warmup_iterations=3)
    buf, stats, history = ReplayBuffer(), VerifyStats(), []
    for it in range(12):
        prompts = [((q, it), [BOS]) for q in range(4) for _ in range(8)]
        done = rollout_step(prompts, buf, generate, it, roll)
        groups: dict = {}
        for t in done:
            text = "Answer: " + " ".join(LETTERS[x - 1] for x in t.ids if x != EOS)
            r = score("multiple_choice", text, "G", stats) if t.finish_reason == "stop" else 0.0
            groups.setdefault(t.prompt_id, []).append((t, r))
        trajs, rewards, gids = [], [], []
        for gid, items in groups.items():
            lens = [t.num_generated for t, _ in items]
            rewards += total_rewards(lens, [r for _, r in items], it, lp_cfg)
            trajs += [t for t, _ in items]
            gids += [str(gid)] * len(items)
        history.append(sum(r for items in groups.values() for _, r in items) / max(1, len(done)))
        ids_BL, mask_BL = training_tensors(trajs)
        with torch.no_grad():
            logp_old = sequence_logprobs(model(ids_BL), ids_BL, mask_BL)
        opt = torch.optim.Adam(model.parameters(), lr=0.1)  # reset every iteration (k1.5)
        for _ in range(4):
            logp = sequence_logprobs(model(ids_BL), ids_BL, mask_BL)
            loss, _ = opmd_loss(logp, logp_old, torch.tensor(rewards), gids, tau=0.5)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert stats.num_errors == 0
    assert sum(history[:3]) / 3 < 0.3
    assert sum(history[-3:]) / 3 > 0.6, history


def test_doctests_in_rl_modules():
    for info in pkgutil.iter_modules(rl.__path__):
        mod = importlib.import_module(f"moonforge.stages.rl.{info.name}")
        failed, _ = doctest.testmod(mod)
        assert failed == 0, info.name


def test_rl_sources_are_ascii_and_import_no_orchestration():
    root = Path(rl.__file__).parent
    for path in sorted(root.glob("*.py")):
        text = path.read_text()
        assert text.isascii(), path.name
        assert len(text.splitlines()) <= 300, path.name  # style.md: stages/*.py at most ~300 lines
        for node in ast.walk(ast.parse(text)):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for n in names:
                assert n.split(".")[0] not in {"prefect", "mlflow", "dvc"}, (path.name, n)


def test_opmd_forwards_keep_groups_whole_and_share_evenly_over_ranks():
    import pytest

    from moonforge.stages.rl.opmd_update import forwards

    gids = [g for g, n in (("a", 3), ("b", 3), ("c", 2), ("d", 4), ("e", 3)) for _ in range(n)]
    for ranks in (1, 2, 3, 4, 5):
        for rows in (1, 4, 6, 100):
            parts = forwards(gids, rows, ranks)
            assert [i for p in parts for i in p] == list(range(len(gids)))  # every row once, in order
            assert all(p for p in parts) and len(parts) % ranks == 0
            for p in parts:  # a group is never split over forwards
                assert not any(gids[i] in {gids[j] for q in parts if q is not p for j in q} for i in p)
    assert forwards(gids, 6, 1) == forwards(gids, 6)  # one process: the plain cut
    with pytest.raises(ValueError, match="5 finished prompt group.*cannot be shared by 6 ranks"):
        forwards(gids, 4, 6)
