//! CPython `random` port and the leaderboard-v1 few-shot order, against values dumped by CPython
//! (fixtures/eval/make_fixtures.py).

use dusflow::eval::fewshot::{plan, Mode, ShotPool};
use dusflow::eval::PyRandom;
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/eval/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ints(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn mersenne_twister_matches_cpython() {
    let f = fixture("pyrandom.json");
    let mut r = PyRandom::new(42);
    let got: Vec<u64> = (0..1000).map(|_| r.getrandbits(32)).collect();
    assert_eq!(got, ints(&f["u32_seed42"]));
    let mut r = PyRandom::new(0);
    assert_eq!(
        (0..5).map(|_| r.getrandbits(32)).collect::<Vec<_>>(),
        ints(&f["u32_seed0"])
    );
    let mut r = PyRandom::new((1 << 40) + 5);
    assert_eq!(
        (0..10).map(|_| r.getrandbits(40)).collect::<Vec<_>>(),
        ints(&f["bits40_seed2p40"])
    );
    let mut r = PyRandom::new(1234);
    let want: Vec<f64> = f["random_seed1234"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!((0..10).map(|_| r.random()).collect::<Vec<_>>(), want);
}

#[test]
fn shuffle_sample_and_randbelow_match_cpython() {
    let f = fixture("pyrandom.json");
    let mut r = PyRandom::new(42);
    let mut x: Vec<u64> = (0..100).collect();
    r.shuffle(&mut x);
    assert_eq!(x, ints(&f["shuffle100_seed42"]));
    // The set-rejection branch (population larger than the pool threshold) and the pool branch.
    let mut r = PyRandom::new(3);
    assert_eq!(
        r.sample_indices(1000, 25)
            .iter()
            .map(|&i| i as u64)
            .collect::<Vec<_>>(),
        ints(&f["sample_1000_25_seed3"])
    );
    let mut r = PyRandom::new(3);
    assert_eq!(
        r.sample_indices(50, 25)
            .iter()
            .map(|&i| i as u64)
            .collect::<Vec<_>>(),
        ints(&f["sample_50_25_seed3"])
    );
    let mut r = PyRandom::new(9);
    let got: Vec<u64> = [1usize, 2, 3, 7, 100, 1000, 65537, (1 << 31) + 11]
        .iter()
        .map(|&n| r.randbelow(n) as u64)
        .collect();
    assert_eq!(got, ints(&f["randbelow_seed9"]));
}

#[test]
fn leaderboard_v1_fewshot_order_matches_cpython() {
    for case in fixture("v1_fewshot.json").as_array().unwrap() {
        let n_eval = case["n_eval"].as_u64().unwrap() as usize;
        let k = case["k"].as_u64().unwrap() as usize;
        let pool = match case["n_train"].as_u64() {
            Some(n) => ShotPool::Separate(n as usize),
            None => ShotPool::SameAsEval,
        };
        let p = plan(Mode::LeaderboardV1, n_eval, None, k, pool, &|a, b| a == b);
        let order: Vec<u64> = p.order.iter().map(|&i| i as u64).collect();
        assert_eq!(order, ints(&case["order"]), "{case}");
        let shots: Vec<Vec<u64>> = p
            .shots
            .iter()
            .map(|s| s.iter().map(|&i| i as u64).collect())
            .collect();
        let want: Vec<Vec<u64>> = case["shots"].as_array().unwrap().iter().map(ints).collect();
        assert_eq!(shots, want, "n_eval={n_eval} k={k}");
    }
}

#[test]
fn limit_keeps_the_first_documents_of_the_order() {
    let full = plan(
        Mode::LeaderboardV1,
        30,
        None,
        3,
        ShotPool::Separate(40),
        &|_, _| false,
    );
    let cut = plan(
        Mode::LeaderboardV1,
        30,
        Some(5),
        3,
        ShotPool::Separate(40),
        &|_, _| false,
    );
    assert_eq!(cut.order, full.order[..5]);
    assert_eq!(cut.shots, full.shots[..5]);
    let h = plan(
        Mode::Harness,
        30,
        Some(4),
        0,
        ShotPool::Separate(40),
        &|_, _| false,
    );
    assert_eq!(h.order, vec![0, 1, 2, 3]);
    assert!(h.shots.iter().all(Vec::is_empty));
}
