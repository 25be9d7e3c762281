#!/usr/bin/env python3
"""Where the CPU time of a `conclave bench` run goes, by subsystem.

Usage: perf script -i perf.data -F pid,tid,comm,ip,sym > all.script
       scripts/perf-categories.py all.script CLIENT_PID

Reads `perf script` output of a machine-wide `perf record -a -g` (a build with
frame pointers), splits the samples into the bench client (CLIENT_PID), the node
processes (every other pid) and idle (pid 0), and files each sample under the
subsystem it was spent for: the first of the "owner" categories found anywhere on
its stack (signature checks, LMDB commits, other crypto, QUIC/TLS, storage,
serialization), else the first generic one from the leaf up (allocation,
scheduling, runtimes, actor code). docs/BENCHMARKS.md quotes its output.
"""
import re,sys,collections
cats=[
 ('signature verification (Ed25519 verify_strict)', r'verify_strict|verify_frame|ed25519_dalek::verifying'),
 ('other cryptography (seal/open, HPKE, ChaCha20-Poly1305, signing)', r'curve25519|ed25519|chacha|poly1305|hpke|x25519|sha2::|seal_frame|open_frame|aead'),
 ('LMDB commit (page writes, fsync)', r'heed::txn::RwTxn::commit|mdb_txn_commit|_mdb_txn_commit|fdatasync|fsync'),
 ('storage reads and writes (LMDB, batch layers)', r'mdb_|heed::|conclave_storage::'),
 ('QUIC and TLS (quinn, rustls, ring) incl. their syscalls', r'quinn|rustls|ring::|udp_sendmsg|__sys_sendmsg|sendmmsg|recvmsg|udp_recvmsg|__sys_recvmsg'),
 ('serialization (postcard, serde)', r'postcard|serde'),
 ('allocation and copies', r'malloc|_int_free|cfree|realloc|unlink_chunk|__rust_alloc|__rust_dealloc|__rdl_|memmove|memcpy|memcmp|memset'),
 ('scheduling and waiting (futex, epoll, context switch)', r'futex|epoll|schedule|finish_task_switch|__switch_to|pick_next|try_to_wake_up|do_nanosleep'),
 ('async runtimes (tokio, actix) and actor dispatch', r'tokio::|actix|conclave::host|conclave_actors::lifecycle|mio::'),
 ('actor logic (conclave_actors, conclave)', r'conclave_actors|conclave::'),
]
samples=[];cur=None
for line in open(sys.argv[1]):
    if not line.startswith('\t') and not line.startswith(' ') and line.strip():
        m=re.match(r'(\S+)\s+(\d+)/(\d+)',line)
        cur={'comm':m.group(1),'pid':int(m.group(2)),'tid':int(m.group(3)),'st':[]}
        samples.append(cur)
    elif line.strip() and cur is not None:
        parts=line.strip().split(' ',1)
        cur['st'].append(parts[1] if len(parts)>1 else '')
client=int(sys.argv[2])
role=lambda p: 'idle' if p==0 else ('client' if p==client else 'servers')
agg={r:collections.Counter() for r in ['client','servers','idle']}
for s in samples:
    r=role(s['pid'])
    c='other'
    owners=cats[:6]   # whole-stack: the subsystem a sample is spent for
    generic=cats[6:]  # leaf-first: what is left
    for name,pat in owners:
        if any(re.search(pat,f) for f in s['st']): c=name;break
    if c=='other':
        for f in s['st']:
            hit=None
            for name,pat in generic:
                if re.search(pat,f): hit=name;break
            if hit: c=hit;break
    agg[r][c]+=1
tot=len(samples)
for r in ['servers','client']:
    n=sum(agg[r].values())
    print(f"== {r}: {100*n/tot:.1f}% of all samples")
    for k,v in agg[r].most_common(): print(f"  {100*v/n:5.1f}%  {k}")
print("idle", 100*sum(agg['idle'].values())/tot)
