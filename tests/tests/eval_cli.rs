//! `troupe gen` and `troupe eval` run as real processes: the JSON contract, exit codes,
//! error messages naming file, line and field, and quality on the shared data sets.

use std::path::Path;

use serde_json::Value;
use troupe_tests::{parse_report, shared_data, timed, troupe};

fn gen(dir: &Path, users: &str, items: &str, events: &str) {
    let out = troupe(&[
        "gen",
        "--out",
        dir.to_str().unwrap(),
        "--users",
        users,
        "--items",
        items,
        "--events",
        events,
        "--seed",
        "7",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check_contract(r: &Value) {
    assert_eq!(r["schema"], 1);
    assert!(r["users"].as_u64().unwrap() > 0);
    let models = r["models"].as_object().unwrap();
    let mut keys: Vec<&str> = models.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec!["als", "content", "ensemble", "item_item", "popularity"]
    );
    for (name, m) in models {
        for f in ["precision", "recall", "map", "ndcg", "coverage"] {
            let v = m[f]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}.{f} missing"));
            assert!((0.0..=1.0).contains(&v), "{name}.{f} = {v}");
        }
        assert!(m["fit_seconds"].as_f64().unwrap() >= 0.0);
    }
    assert!(r["details"]["blend"]["weights"].is_object());
    assert!(r["details"]["ensemble_mean_share"].is_object());
}

#[test]
fn synthetic_eval_has_the_contracted_shape_and_real_signal() {
    let _t = timed();
    let d = tempfile::tempdir().unwrap();
    gen(d.path(), "1500", "600", "60000");
    let ev = d.path().join("events.csv");
    let items = d.path().join("items.csv");
    let out = troupe(&[
        "eval",
        "--events",
        ev.to_str().unwrap(),
        "--items",
        items.to_str().unwrap(),
        "--split",
        "random",
        "--holdout",
        "0.2",
        "--seed",
        "42",
        "--iterations",
        "8",
        "--json",
    ]);
    let r = parse_report(&out);
    check_contract(&r);
    assert_eq!(r["encoder"], "tfidf");
    let ndcg = |m: &str| r["models"][m]["ndcg"].as_f64().unwrap();
    // The generator plants cluster structure: every learned branch beats chance by far.
    assert!(ndcg("als") > 0.05, "{r}");
    assert!(ndcg("content") > 0.02, "{r}");
    assert!(ndcg("ensemble") > 0.05, "{r}");
}

#[test]
fn tiny_onnx_model_runs_through_eval() {
    let _t = timed();
    let d = tempfile::tempdir().unwrap();
    gen(d.path(), "300", "120", "6000");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/models/tests/data/tiny-bert");
    let out = troupe(&[
        "eval",
        "--events",
        d.path().join("events.csv").to_str().unwrap(),
        "--items",
        d.path().join("items.csv").to_str().unwrap(),
        "--split",
        "time",
        "--iterations",
        "3",
        "--content-model",
        model.to_str().unwrap(),
        "--json",
    ]);
    let r = parse_report(&out);
    check_contract(&r);
    assert_eq!(r["encoder"], "onnx:tiny-bert");
}

#[test]
fn bad_input_exits_2_naming_file_line_and_field() {
    let _t = timed();
    let d = tempfile::tempdir().unwrap();
    let items = d.path().join("items.csv");
    std::fs::write(&items, "item,text\na,hello\nb,world\n").unwrap();
    let train = d.path().join("train.csv");
    std::fs::write(&train, "user,item,rating,ts\nu1,a,4,10\nu2,b,oops,11\n").unwrap();
    let test = d.path().join("test.csv");
    std::fs::write(&test, "user,item,rating,ts\nu1,b,4,12\n").unwrap();
    let args = |extra: &[&str]| {
        let mut v = vec![
            "eval",
            "--train",
            train.to_str().unwrap(),
            "--test",
            test.to_str().unwrap(),
            "--items",
            items.to_str().unwrap(),
            "--json",
        ];
        v.extend_from_slice(extra);
        v.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        troupe(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("train.csv:3") && last.contains("`rating`"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    // Skipping bad rows gets through, with one evaluated user.
    let out = run(&["--skip-bad-rows", "--iterations", "2", "--factors", "4"]);
    let r = parse_report(&out);
    assert_eq!(r["users"], 1);

    // Zero evaluated users is an error.
    let out = run(&["--skip-bad-rows", "--min-value", "5"]);
    assert_eq!(out.status.code(), Some(2));

    // Bad flags.
    let out = troupe(&[
        "eval",
        "--train",
        train.to_str().unwrap(),
        "--items",
        items.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["--k", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["--weights", "als=x"]);
    assert_eq!(out.status.code(), Some(2));
    let missing = d.path().join("nope.csv");
    let out = troupe(&[
        "eval",
        "--events",
        missing.to_str().unwrap(),
        "--split",
        "time",
        "--items",
        items.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.csv"));
}

#[test]
fn gen_is_deterministic() {
    let _t = timed();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    gen(a.path(), "200", "50", "3000");
    gen(b.path(), "200", "50", "3000");
    for f in ["events.csv", "items.csv"] {
        assert_eq!(
            std::fs::read(a.path().join(f)).unwrap(),
            std::fs::read(b.path().join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn movielens_default_eval_meets_the_peer_figures() {
    let _t = timed();
    let Some(data) = shared_data() else { return };
    let ml = data.join("ml-latest-small");
    let split = ml.join("split");
    for (min_value, peer_ndcg) in [(Some("4"), 0.208), (None, 0.305)] {
        let mut args = vec![
            "eval".to_string(),
            "--train".into(),
            split.join("train.csv").display().to_string(),
            "--test".into(),
            split.join("test.csv").display().to_string(),
            "--items".into(),
            ml.join("movies.csv").display().to_string(),
            "--json".into(),
        ];
        if let Some(v) = min_value {
            args.extend(["--min-value".to_string(), v.to_string()]);
        }
        let out = troupe(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let r = parse_report(&out);
        check_contract(&r);
        let users = r["users"].as_u64().unwrap();
        assert_eq!(users, if min_value.is_some() { 598 } else { 610 });
        let als = r["models"]["als"]["ndcg"].as_f64().unwrap();
        let ens = r["models"]["ensemble"]["ndcg"].as_f64().unwrap();
        let best_single = ["als", "content", "popularity", "item_item"]
            .iter()
            .map(|m| r["models"][m]["ndcg"].as_f64().unwrap())
            .fold(0.0, f64::max);
        assert!(
            als >= peer_ndcg,
            "ALS NDCG@10 {als} below the peer's {peer_ndcg} (min-value {min_value:?})"
        );
        assert!(
            ens >= best_single,
            "ensemble {ens} below best single branch {best_single}"
        );
    }
}

#[test]
fn a_saved_split_evaluates_like_the_split_it_came_from() {
    let _t = timed();
    let d = tempfile::tempdir().unwrap();
    gen(d.path(), "150", "120", "6000");
    let ev = d.path().join("events.csv");
    let items = d.path().join("items.csv");
    let split = d.path().join("split");
    let (ev, items, split) = (
        ev.to_str().unwrap(),
        items.to_str().unwrap(),
        split.to_str().unwrap(),
    );
    let common = ["--items", items, "--iterations", "3", "--json"];
    let mut a = vec![
        "eval",
        "--events",
        ev,
        "--split",
        "time",
        "--save-split",
        split,
    ];
    a.extend_from_slice(&common);
    let first = parse_report(&troupe(&a));
    let (train, test) = (format!("{split}/train.csv"), format!("{split}/test.csv"));
    let mut b = vec!["eval", "--train", &train, "--test", &test];
    b.extend_from_slice(&common);
    let second = parse_report(&troupe(&b));
    assert_eq!(first["users"], second["users"]);
    for m in ["popularity", "als", "content", "item_item", "ensemble"] {
        let (x, y) = (&first["models"][m]["ndcg"], &second["models"][m]["ndcg"]);
        assert!(x.as_f64().unwrap() > 0.0, "{m}: {x}");
        assert_eq!(x, y, "{m}");
    }
}

#[test]
fn online_retail_loads_as_shipped() {
    let _t = timed();
    let Some(data) = shared_data() else { return };
    let or = data.join("online-retail");
    let out = troupe(&[
        "eval",
        "--events",
        or.join("events.csv.gz").to_str().unwrap(),
        "--items",
        or.join("items.csv").to_str().unwrap(),
        "--split",
        "time",
        "--iterations",
        "5",
        "--json",
    ]);
    let r = parse_report(&out);
    check_contract(&r);
    assert!(r["users"].as_u64().unwrap() > 3000);
}

#[test]
fn eval_with_a_node_config_uses_its_settings_and_refuses_competing_flags() {
    let _t = timed();
    let d = tempfile::tempdir().unwrap();
    gen(d.path(), "200", "150", "8000");
    let ev = d.path().join("events.csv");
    let items = d.path().join("items.csv");
    let config = d.path().join("node.toml");
    std::fs::write(
        &config,
        "[als]\nfactors = 8\niterations = 3\n[ranker]\nweight_als = 0.5\nweight_content = 0.25\nweight_popularity = 0.25\nweight_item_item = 0\n[item_item]\nlambda = 200.0\nneighbours = 50\n[popularity]\nhalf_life_hours = 48.0\n",
    )
    .unwrap();
    let args = |extra: &[&str]| {
        let mut v = vec![
            "eval",
            "--events",
            ev.to_str().unwrap(),
            "--split",
            "random",
            "--items",
            items.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--json",
        ];
        v.extend_from_slice(extra);
        troupe(&v)
    };
    let r = parse_report(&args(&[]));
    check_contract(&r);
    let blend = &r["details"]["blend"]["weights"];
    assert_eq!(blend["als"].as_f64(), Some(0.5), "{blend}");
    assert_eq!(blend["content"].as_f64(), Some(0.25), "{blend}");
    assert_eq!(blend["item_item"].as_f64(), Some(0.0), "{blend}");
    let ii = &r["details"]["item_item"]["params"];
    assert_eq!(
        (ii["lambda"].as_f64(), ii["neighbours"].as_u64()),
        (Some(200.0), Some(50)),
        "{ii}"
    );
    assert_eq!(r["details"]["als"]["factors"], 8);
    assert_eq!(
        r["details"]["popularity_half_life_days"].as_f64(),
        Some(2.0)
    );
    let out = args(&["--factors", "16"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--factors"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--plot` draws NDCG@k for k = 1..50 of every branch and the ensemble as SVG; the
/// curves in the report agree with the table's NDCG@K at K. `plot-ratios` draws a ratio
/// table and names the file and field of a bad row.
#[test]
fn eval_plot_and_ratio_charts_are_drawn() {
    let _t = timed();
    let d = tempfile::tempdir().unwrap();
    gen(d.path(), "400", "200", "12000");
    let svg = d.path().join("ndcg.svg");
    let out = troupe(&[
        "eval",
        "--events",
        d.path().join("events.csv").to_str().unwrap(),
        "--items",
        d.path().join("items.csv").to_str().unwrap(),
        "--split",
        "random",
        "--json",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let r = parse_report(&out);
    // Not a terminal: no progress bars or colour codes on stderr.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains('\x1b') && !err.contains('\r'), "{err}");
    let curves = &r["details"]["ndcg_curve"];
    assert_eq!(curves["k"].as_array().unwrap().len(), 50);
    let k = r["k"].as_u64().unwrap() as usize;
    for m in ["als", "content", "popularity", "item_item", "ensemble"] {
        let c = curves[m].as_array().unwrap();
        assert_eq!(c.len(), 50, "{m}");
        let at_k = c[k - 1].as_f64().unwrap();
        let table = r["models"][m]["ndcg"].as_f64().unwrap();
        assert!(
            (at_k - table).abs() < 1e-9,
            "{m}: curve {at_k} vs table {table}"
        );
    }
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "{}", &text[..text.len().min(200)]);
    for m in ["ensemble", "als", "content", "popularity"] {
        assert!(text.contains(m), "{m} missing from the chart");
    }

    let table = d.path().join("ratios.json");
    std::fs::write(
        &table,
        r#"{"title": "ingest", "rows": [{"label": "batch 1000", "ratio": 0.41}, {"label": "batch 100", "ratio": 0.35}]}"#,
    )
    .unwrap();
    let chart = d.path().join("ratios.svg");
    let out = troupe(&[
        "plot-ratios",
        "--input",
        table.to_str().unwrap(),
        "--out",
        chart.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&chart).unwrap();
    assert!(text.contains("batch 1000") && text.contains("0.41"));
    std::fs::write(&table, r#"{"rows": [{"label": "x", "ratio": "fast"}]}"#).unwrap();
    let out = troupe(&[
        "plot-ratios",
        "--input",
        table.to_str().unwrap(),
        "--out",
        chart.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ratios.json") && err.contains("rows[0].ratio"),
        "{err}"
    );
}
