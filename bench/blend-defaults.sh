#!/usr/bin/env bash
# Chooses the default blend on validation data only: carves a validation split out of
# each data set's *train* part (MovieLens: the protocol's train file, random 20 % per user;
# Online Retail: the first 80 % of each customer's purchases by time, then the last 20 %
# of those), evaluates every blend of a weight grid with `troupe eval`, and prints per
# blend the validation NDCG@10 and its gain over the best single branch on each set.
# Usage: bench/blend-defaults.sh [troupe binary] > grid.tsv
set -euo pipefail
T=${1:-target/release/troupe}
SHARED=${SHARED:-../shared/data}
S=$SHARED/ml-latest-small
R=$SHARED/online-retail
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT

# Online Retail: the evaluation's own time split first, then validation inside its train.
$T eval --events "$R/events.csv.gz" --items "$R/items.csv" --split time \
    --save-split "$W/or-test" --json >/dev/null 2>&1
$T eval --events "$W/or-test/train.csv" --items "$R/items.csv" --split time \
    --save-split "$W/or" --json >/dev/null 2>&1
$T eval --events "$S/split/train.csv" --items "$S/movies.csv" --split random \
    --save-split "$W/ml" --json >/dev/null 2>&1

run() { # set items weights norm -> "als content pop ensemble"
    $T eval --train "$W/$1/train.csv" --test "$W/$1/test.csv" --items "$2" \
        --weights "$3" --normalization "$4" --json 2>/dev/null |
        jq -r '[.models.als.ndcg, .models.content.ndcg, .models.popularity.ndcg, .models.ensemble.ndcg] | @tsv'
}

printf 'norm\tals\tcontent\tpopularity\tml_ndcg\tml_gain\tor_ndcg\tor_gain\n'
for norm in ${NORMS:-rrf zscore}; do
    for wa in ${ALS_WEIGHTS:-0.4 0.5 0.6 0.7 0.8 0.9 1.0}; do
        for wc in ${CONTENT_WEIGHTS:-0 0.05 0.1 0.15 0.2 0.3 0.4}; do
            wp=$(echo "1 - $wa - $wc" | bc -l)
            if (( $(echo "$wp < -0.0001" | bc -l) )); then continue; fi
            wp=$(printf '%.2f' "$wp")
            w="als=$wa,content=$wc,popularity=$wp"
            read -r ma mc mp me < <(run ml "$S/movies.csv" "$w" "$norm")
            read -r oa oc op oe < <(run or "$R/items.csv" "$w" "$norm")
            mb=$(printf '%s\n' "$ma" "$mc" "$mp" | sort -g | tail -1)
            ob=$(printf '%s\n' "$oa" "$oc" "$op" | sort -g | tail -1)
            printf '%s\t%s\t%s\t%s\t%.4f\t%+.4f\t%.4f\t%+.4f\n' "$norm" "$wa" "$wc" "$wp" \
                "$me" "$(echo "$me - $mb" | bc -l)" "$oe" "$(echo "$oe - $ob" | bc -l)"
        done
    done
done
