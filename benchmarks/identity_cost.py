"""What part identity's descriptors cost per batch (classic backend, the describe stage):
`identity.part_identities` of 8 images x 9 part masks at 224 px (each a 40 x 20 box), the
measure.identity_descriptor given (default outline_or_moment), best of 3 rounds of 10 calls.

    PYTHONPATH=. python benchmarks/identity_cost.py [--descriptor outline_and_moment]
"""
import argparse
import time

import torch

from linewatch.detector.identity import part_identities

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--descriptor", default="outline_or_moment")
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
torch.set_num_threads(args.threads)
masks = torch.zeros(8, 9, 224, 224, dtype=torch.bool)
masks[:, :, 50:90, 60:80] = True
outlines = torch.nn.functional.normalize(torch.rand(8, 9, 80, generator=torch.Generator().manual_seed(0)), dim=-1)
part_identities(outlines, masks, args.descriptor)  # warm
rounds = []
for _ in range(3):
    start = time.perf_counter()
    for _ in range(10):
        part_identities(outlines, masks, args.descriptor)
    rounds.append((time.perf_counter() - start) / 10)
print(f"part_identities ({args.descriptor}), 8 images x 9 masks at 224 px: {1000 * min(rounds):.1f} ms per batch "
      f"(rounds {', '.join(f'{1000 * r:.1f}' for r in rounds)})")
