# Prints the Markdown tables of reports/PERFORMANCE.md from the sweep summaries in this folder.
# Usage (from the repo root): python3 reports/sweep/table.py mif10000 mif20000 ...
import json,sys,os
rows=sys.argv[1:]
print("| run | flags | msgs/s | elapsed s | e2e p50 / p99 ms | queue wait p50 / p99 ms | overhead p50 / p99 ms | failover ms | Redis CPU s | apps CPU s | Redis cmds/msg | scripts/msg | app RSS MB | Redis peak MB | verdict |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
idx={}
for line in open('reports/sweep/index.txt'):
    p=line.split()
    if len(p)>1: idx[p[0]]=' '.join(x for x in p[1:] if not x.startswith('rc='))
for r in rows:
    f='reports/sweep/%s.json'%r
    if not os.path.exists(f): continue
    d=json.load(open(f))
    l,q,o=d['latency_ms'],d['queue_wait_ms'],d['overhead_ms']
    print("| %s | `%s` | %.0f | %.2f | %.0f / %.0f | %.1f / %.1f | %.1f / %.1f | %s | %.1f | %.1f | %.2f | %.4f | %.0f | %.0f | %s |"%(r,idx.get(r,''),d['throughput_msgs_per_s'],d['elapsed_s'],l['p50'],l['p99'],q['p50'],q['p99'],o['p50'],o['p99'],', '.join('%.0f'%x for x in d['failover_ms']),d['redis_cpu_s'],d['apps_cpu_s'],d['redis_commands_per_msg'],d['redis_scripts_per_msg'],d['app_peak_rss_mb'],d['redis_used_memory_peak_bytes']/1e6,d['verdict']))
