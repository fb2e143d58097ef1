# Paired differences between two peers of a bench run, sourced by bench scripts
# (bench/authz, bench/seed-route). Peers measured back to back in each round share
# the machine's slow and fast spells: the difference taken round by round is steadier
# than the difference of the two medians.
#
# Input (stdin): lines "ROUND PEER VALUE ...".

# paired_diffs A B: each round's A minus the same round's B, one per line, in round order.
paired_diffs() {
  awk -v a="$1" -v b="$2" '$2 == a {x[$1] = $3} $2 == b {y[$1] = $3}
    END {for (r in x) if (r in y) print r, x[r] - y[r]}' | sort -n | awk '{print $2}'
}

# paired_summary A B: "MEDIAN Q1 Q3 N MIN MAX" of paired_diffs A B (empty when no round has both).
paired_summary() {
  paired_diffs "$1" "$2" | sort -g | awk '{d[NR] = $1} END {if (NR == 0) exit; hi = int(3 * NR / 4 + 0.5); if (hi < 1) hi = 1
    printf "%.2f %.2f %.2f %d %.2f %.2f\n", d[int((NR + 1) / 2)], d[int(NR / 4) + 1], d[hi], NR, d[1], d[NR]}'
}
