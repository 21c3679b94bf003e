#!/usr/bin/env python3
"""Where etcd spends its CPU: the top functions of a Go pprof CPU profile.

etcd 3.4's binary is stripped, so `perf` names nothing in it, but etcd profiles itself:

    ETCD_ENABLE_PPROF=true BENCH_ONLY_DISTINCT=25 BENCH_SLOW_SYNC_US=0 BENCH_SCALING=0 \
        cargo bench --features etcd --bench etcd        # prints "etcd http://..."
    curl -s "$ETCD/debug/pprof/profile?seconds=12" -o etcd.pprof
    python3 benches/etcd_pprof.py etcd.pprof [substring]

(etcd reads its flags from the environment; the bench's etcd inherits it.) Prints the
profile's total, the functions where samples landed (flat) and those on the stack
(cumulative, only names containing `substring` if given). Standard library only: the
profile is a gzipped protobuf, decoded here field by field, so no `go tool pprof` is needed.
"""

import collections
import gzip
import sys


def varint(buf, i):
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def fields(buf):
    """(field number, wire type, value) of each field of one protobuf message."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
        elif wire == 2:
            n, i = varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire} in a pprof profile")
        yield number, wire, value


def integers(wire, value):
    """A repeated integer field: one varint, or a packed run of them."""
    if wire == 0:
        return [value]
    out, i = [], 0
    while i < len(value):
        x, i = varint(value, i)
        out.append(x)
    return out


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    # profile.proto: 2 sample, 4 location, 5 function, 6 string table.
    profile = gzip.decompress(open(sys.argv[1], "rb").read())
    strings, function_names, locations, samples = [], {}, {}, []
    for number, wire, value in fields(profile):
        if number == 6:
            strings.append(value.decode("utf-8", "replace"))
        elif number == 5:
            function = {n: v for n, _, v in fields(value)}
            function_names[function.get(1)] = function.get(2, 0)
        elif number == 4:
            location_id, lines = None, []
            for n, _, v in fields(value):
                if n == 1:
                    location_id = v
                elif n == 4:
                    lines.append({m: w for m, _, w in fields(v)}.get(1))
            locations[location_id] = lines
        elif number == 2:
            ids, values = [], []
            for n, w, v in fields(value):
                if n == 1:
                    ids += integers(w, v)
                elif n == 2:
                    values += integers(w, v)
            samples.append((ids, values))
    flat, cumulative, total = collections.Counter(), collections.Counter(), 0
    for ids, values in samples:
        nanos = values[-1]  # cpu nanoseconds (the first value counts samples)
        total += nanos
        stack = [
            strings[function_names[f]] for loc in ids for f in locations[loc]
        ]
        if stack:
            flat[stack[0]] += nanos
        for name in set(stack):
            cumulative[name] += nanos
    pattern = sys.argv[2] if len(sys.argv) > 2 else ""
    print(f"total {total / 1e9:.2f} s of CPU")
    print("-- flat")
    for name, nanos in flat.most_common(25):
        print(f"{100 * nanos / total:5.1f}% {name}")
    print("-- cumulative")
    for name, nanos in cumulative.most_common():
        if pattern in name:
            print(f"{100 * nanos / total:5.1f}% {name}")
            if pattern == "" and nanos < total / 20:
                break


if __name__ == "__main__":
    main()
