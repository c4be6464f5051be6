#!/usr/bin/env bash
# Chooses the default blend on validation data only: carves a validation split out of
# each data set's *train* part (MovieLens: the protocol's train file, random 20 % per user;
# Online Retail: the first 80 % of each customer's purchases by time, then the last 20 %
# of those), evaluates every blend of a weight grid with `troupe eval`, and prints per
# blend the validation NDCG@10 and its gain over the best single branch (of four) on each
# set.
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

run() { # set items weights norm -> "als content pop item_item ensemble"
    $T eval --train "$W/$1/train.csv" --test "$W/$1/test.csv" --items "$2" \
        --weights "$3" --normalization "$4" --json 2>/dev/null |
        jq -r '[.models.als.ndcg, .models.content.ndcg, .models.popularity.ndcg, .models.item_item.ndcg, .models.ensemble.ndcg] | @tsv'
}

# The item-item branch takes what the other three leave (weights sum to 1).
printf 'norm\tals\tcontent\tpopularity\titem_item\tml_ndcg\tml_gain\tor_ndcg\tor_gain\n'
for norm in ${NORMS:-zscore}; do
    for wa in ${ALS_WEIGHTS:-0.1 0.2 0.3}; do
        for wc in ${CONTENT_WEIGHTS:-0.1 0.2}; do
            for wp in ${POPULARITY_WEIGHTS:-0 0.1 0.2}; do
                wi=$(printf '%.2f' "$(echo "1 - $wa - $wc - $wp" | bc -l)")
                if (( $(echo "$wi < -0.0001" | bc -l) )); then continue; fi
                w="als=$wa,content=$wc,popularity=$wp,item_item=$wi"
                read -r ma mc mp mi me < <(run ml "$S/movies.csv" "$w" "$norm")
                read -r oa oc op oi oe < <(run or "$R/items.csv" "$w" "$norm")
                mb=$(printf '%s\n' "$ma" "$mc" "$mp" "$mi" | sort -g | tail -1)
                ob=$(printf '%s\n' "$oa" "$oc" "$op" "$oi" | sort -g | tail -1)
                printf '%s\t%s\t%s\t%s\t%s\t%.4f\t%+.4f\t%.4f\t%+.4f\n' "$norm" "$wa" "$wc" "$wp" "$wi" \
                    "$me" "$(echo "$me - $mb" | bc -l)" "$oe" "$(echo "$oe - $ob" | bc -l)"
            done
        done
    done
done
