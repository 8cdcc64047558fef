r"""Where the device time of a profiled step goes, from a Perfetto trace of bench/common.py's
`profile_trace` (bench/results/trace_<config>.json.gz; `BENCH_TRACE=<config>` for
bench/train_step.py).

  python bench/trace_summary.py bench/results/trace_decoder_gpu_s.json.gz [--top 25]

Sums the complete events ('X') of each device track (on a GPU: its kernels), by kernel
class (convolution, matmul, attention, fusion, copy, other) and by kernel name, and prints
the busy time beside the wall span of the traced calls: busy well under span means the
device waited on the host (launch gaps), busy near span means the kernels themselves are
the cost.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re

_CLASSES = (   # first match wins; GPU kernel names (cuDNN, cuBLAS / CUTLASS, XLA fusions)
    ('attention', re.compile(r'fmha|flash|sdpa|attention', re.I)),
    ('convolution', re.compile(r'conv|cudnn|xmma|implicit_gemm|wgrad|dgrad|fprop', re.I)),
    ('matmul', re.compile(r'gemm|nvjet|cutlass|cublas|matmul|dot', re.I)),
    ('copy', re.compile(r'memcpy|memset|copy|transpose', re.I)),
    ('fusion', re.compile(r'fusion|reduce|loop_|input_|triton', re.I)),
)


def kernel_class(name: str) -> str:
  for cls, pat in _CLASSES:
    if pat.search(name):
      return cls
  return 'other'


def load(path: str) -> dict:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt') as f:
    return json.load(f)


def summarize(trace: dict) -> dict:
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  pid_names = {e['pid']: e.get('args', {}).get('name', '')
               for e in events if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  tracks = {}
  for e in events:
    if e.get('ph') != 'X' or 'dur' not in e:
      continue
    pname = pid_names.get(e['pid'], str(e['pid']))
    t = tracks.setdefault(pname, dict(busy_us=0.0, start=float('inf'), end=0.0, n=0,
                                      by_class=collections.Counter(),
                                      by_name=collections.Counter()))
    dur = float(e['dur'])
    t['busy_us'] += dur
    t['n'] += 1
    t['start'] = min(t['start'], float(e['ts']))
    t['end'] = max(t['end'], float(e['ts']) + dur)
    t['by_class'][kernel_class(e['name'])] += dur
    t['by_name'][e['name']] += dur
  return tracks


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('trace')
  ap.add_argument('--top', type=int, default=20)
  ap.add_argument('--all_tracks', action='store_true',
                  help='also the host tracks (by default only tracks named like a device)')
  a = ap.parse_args()
  tracks = summarize(load(a.trace))
  shown = {k: v for k, v in tracks.items()
           if a.all_tracks or re.search(r'device|gpu|tpu', k, re.I)} or tracks
  for name, t in sorted(shown.items(), key=lambda kv: -kv[1]['busy_us']):
    span = max(t['end'] - t['start'], 1e-9)
    # Overlapping events on one track (streams) can make busy exceed the span.
    print(f'== {name}: {t["n"]} events, busy {t["busy_us"] / 1e3:.2f} ms over a '
          f'{span / 1e3:.2f} ms span')
    for cls, us in t['by_class'].most_common():
      print(f'  {cls:12s} {us / 1e3:9.2f} ms  {100 * us / t["busy_us"]:5.1f}%')
    for kname, us in t['by_name'].most_common(a.top):
      print(f'    {us / 1e3:9.2f} ms  {100 * us / t["busy_us"]:5.1f}%  {kname[:110]}')


if __name__ == '__main__':
  main()
