#!/bin/bash
# BPF run time per pooled transaction: pgbench -S through PgBouncer (transaction pooling),
# with the tracer watching both ports; bpf_stats of the daemon's own programs (found by the
# program ids in its fdinfo). Run as root from the workspace after `cargo xtask build`.
set -e
D=${TMPDIR:-/tmp}/tracer-pooled-bench; rm -rf $D; mkdir -p $D; chown postgres $D
B=/usr/lib/postgresql/15/bin
su postgres -c "$B/initdb -D $D/data -A trust >/dev/null"
su postgres -c "$B/pg_ctl -D $D/data -o '-p 25432 -k $D -c listen_addresses=127.0.0.1' -l $D/log start >/dev/null"
cat > $D/pgb.ini <<INI
[databases]
postgres = host=127.0.0.1 port=25432 dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = 26432
auth_type = trust
auth_file = $D/users.txt
pool_mode = transaction
default_pool_size = 5
unix_socket_dir =
logfile = $D/pgb.log
pidfile = $D/pgb.pid
INI
echo '"postgres" ""' > $D/users.txt; chown -R postgres $D
su postgres -c "pgbouncer -d $D/pgb.ini"
sleep 1
su postgres -c "pgbench -i -s 1 -h 127.0.0.1 -p 25432 postgres >/dev/null 2>&1"
${TRACER_BIN:-target/release/tracer} run --port 25432,26432 --metrics-addr off --events /dev/null --state-dir off 2>$D/tracer.log &
TP=$!
sleep 4
sysctl -qw kernel.bpf_stats_enabled=1
stats() { ids=$(grep -h "^prog_id:" /proc/$TP/fdinfo/* 2>/dev/null | awk '{print $2}' | sort -u | tr '\n' ' '); bpftool -j prog show | python3 -c "import json,sys; ids=set(map(int,sys.argv[1].split())); p=[x for x in json.load(sys.stdin) if x['id'] in ids]; print(sum(x.get('run_time_ns',0) for x in p), sum(x.get('run_cnt',0) for x in p))" "$ids"; }
read ns0 c0 < <(stats)
out=$(su postgres -c "pgbench -n -S -c 8 -T 20 -h 127.0.0.1 -p 26432 postgres 2>&1")
read ns1 c1 < <(stats)
sysctl -qw kernel.bpf_stats_enabled=0
tx=$(echo "$out" | awk '/number of transactions actually processed/ {print $NF}' | cut -d/ -f1)
echo "$out" | grep -E "tps|processed"
echo "pooled select-only: $tx transactions, BPF $(( (ns1-ns0) )) ns in $((c1-c0)) runs: $(( (ns1-ns0)/tx )) ns and $(( (c1-c0)/tx )) program runs per transaction"
kill $TP; wait $TP 2>/dev/null || true
kill $(cat $D/pgb.pid)
su postgres -c "$B/pg_ctl -D $D/data stop -m fast >/dev/null"
