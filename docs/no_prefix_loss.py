"""An experiment of docs/numbers.md ("Tried: no LM loss on the number to draw"), not a default:
train_mnist.py with no LM loss where the target is a digit of the number written before ';' in
a draw sequence, or that ';' itself (BOS 2 0 2 6 ; ...: the four digits and the ';' after 6).
Those digits are drawn uniformly at random, so their loss cannot fall below ln 10; the question
was whether their gradient noise slows the captioner. Run from the repository's root, with
train_mnist.py's flags:

    python docs/no_prefix_loss.py --data-dir DIR --out OUT --seed S --eval-per-label 0 --eval-numbers 0
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_mnist  # noqa: E402
import transfusion  # noqa: E402

paper_objective = transfusion.objective


def objective(cfg, batch, logits, eps_hat, eps):
    # how many SEPs and patches each position's sequence has shown so far; 0 = still in the number
    flag = ((batch.tokens == train_mnist.SEP) | (batch.img_id >= 0)).long()   # (B, S)
    seen_in_row = flag.cumsum(1)                                               # (B, S)
    starts = torch.ones_like(batch.seq, dtype=torch.bool)                      # (B, S) first position of a sequence
    starts[:, 1:] = batch.seq[:, 1:] != batch.seq[:, :-1]
    # a packed row holds several sequences: subtract the count seen before each one began
    before = torch.where(starts, seen_in_row - flag, torch.zeros_like(flag)).cummax(1).values
    seen = seen_in_row - before                                                # (B, S)
    target = batch.tokens[:, 1:]                                               # (B, S-1)
    drop = (seen[:, :-1] == 0) & ((target < 10) | (target == train_mnist.SEP))  # (B, S-1)
    # mark those inputs as BOI, so that the paper's rule "no LM loss where the input is BOI"
    # (footnote 8) drops them; each is BOS or a dropped digit, so no kept target changes
    tokens = batch.tokens.clone()
    tokens[:, :-1][drop] = cfg.boi_id
    return paper_objective(cfg, transfusion.Batch(**{**batch.__dict__, "tokens": tokens}), logits, eps_hat, eps)


transfusion.objective = objective  # transfusion_loss looks it up at each call

if __name__ == "__main__":
    sys.exit(train_mnist.main())
