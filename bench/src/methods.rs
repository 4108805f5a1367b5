//! The baselines: cold start and local fork (one at a time, and children/s).

use mitosis_testbed::Host;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::procs::{Server, answer_pid, kill_and_wait_reaped, private_kib, run_timed, same_answer};
use crate::results::{COLD_START, LOCAL_FORK, MAX_FAILURES, Method, Throughput};
use crate::seeds::{Seed, request};

/// A request and the cold start's answer to it.
pub type Pair = (String, String);

/// The `i`-th sample's request and expected answer (cycling through `pairs`).
pub fn nth(pairs: &[Pair], i: usize) -> (&str, &str) {
    let (req, want) = &pairs[i % pairs.len()];
    (req, want)
}

/// `warmup` unmeasured requests (n = 1000, 1001, ...; no expected answer), then `samples`
/// measured ones with the answers they must get.
pub fn schedule(
    warmup: usize,
    samples: usize,
    pairs: &[Pair],
) -> impl Iterator<Item = (String, Option<&str>)> {
    let warm = (0..warmup).map(|i| (request(1000 + i), None));
    let measured = (0..samples).map(move |i| {
        let (req, want) = nth(pairs, i);
        (req.to_owned(), Some(want))
    });
    warm.chain(measured)
}

/// Whether `answer` is right: the expected one (pid aside), or any real answer for a warm-up.
pub fn is_right(answer: &str, want: Option<&str>) -> bool {
    match want {
        Some(want) => same_answer(answer, want),
        None => is_answer(answer),
    }
}

/// Whether an answer line is a real answer (not empty, not the seed's error line).
pub fn is_answer(line: &str) -> bool {
    line.starts_with('{') && !line.contains("\"error\":")
}

/// `python3 SEED --once` on `host`, `samples` times (after `warmup` unmeasured runs): its
/// latencies, and each request with the answer it got, which every other method must match.
pub fn cold_start(seed: &Seed, host: &Host, warmup: usize, samples: usize) -> (Method, Vec<Pair>) {
    let mut method = Method::new(COLD_START, "cold start (python3 --once)");
    let mut pairs = Vec::with_capacity(samples);
    let warm = (0..warmup).map(|i| (true, request(1000 + i)));
    let measured = (1..=samples).map(|i| (false, request(i)));
    for (is_warmup, req) in warm.chain(measured) {
        method.attempted += usize::from(!is_warmup);
        let outcome = run_timed(seed.command(host, &["--once"]), &req);
        match outcome {
            Ok(run) if run.status == 0 && is_answer(&run.answer) => {
                if !is_warmup {
                    method.latencies.push(run.latency);
                    pairs.push((req, run.answer));
                }
            }
            Ok(run) => {
                let what = format!(
                    "{req}: status {}, answer {:?}, stderr: {}",
                    run.status,
                    run.answer,
                    last_lines(&run.stderr)
                );
                if method.fail(what) {
                    break;
                }
            }
            Err(err) => {
                if method.fail(format!("{req}: {err:#}")) {
                    break;
                }
            }
        }
    }
    (method, pairs)
}

/// `SEED --fork-server --linger` on `host`: `samples` requests, each answered by a fresh
/// `os.fork()` child; times request written to answer read. After each answer the child's
/// private memory is read, then it is killed. Returns the method and the memory samples (KiB).
pub fn local_fork(
    seed: &Seed,
    host: &Host,
    warmup: usize,
    samples: usize,
    pairs: &[Pair],
) -> (Method, Vec<u64>) {
    let mut method = Method::new(LOCAL_FORK, "local fork (os.fork)");
    let mut private = Vec::new();
    let mut server = match Server::start(seed.command(host, &["--fork-server", "--linger"])) {
        Ok(server) => server,
        Err(err) => {
            method.fail(format!("starting the fork server: {err:#}"));
            method.gave_up = true;
            return (method, private);
        }
    };
    for (req, want) in schedule(warmup, samples, pairs) {
        method.attempted += usize::from(want.is_some());
        let (elapsed, answer) = match server.request(&req) {
            Ok(got) => got,
            Err(err) => {
                if method.fail(format!("{req}: {err:#}")) {
                    break;
                }
                continue;
            }
        };
        let pid = answer_pid(&answer);
        let kib = pid.and_then(private_kib);
        let killed = pid.map(kill_and_wait_reaped);
        let trouble = match killed {
            _ if !is_right(&answer, want) => Some(format!(
                "answer {answer:?} (expected {})",
                want.unwrap_or("an answer")
            )),
            Some(Err(err)) => Some(format!("ending the child: {err:#}")),
            None => Some(format!("no pid in the answer {answer:?}")),
            Some(Ok(())) => None,
        };
        if let Some(trouble) = trouble {
            if method.fail(format!("{req}: {trouble}")) {
                break;
            }
            continue;
        }
        if want.is_some() {
            method.latencies.push(elapsed);
            private.extend(kib);
        }
    }
    (method, private)
}

/// Children/s of local forks from one warm seed: `SEED --fork-pool CONCURRENCY` on `host`,
/// kept `concurrency` requests deep for `secs` (the same closed loops as mitosis's children/s
/// run, so the two figures compare). Only right answers count.
pub fn local_fork_throughput(
    seed: &Seed,
    host: &Host,
    pairs: &[Pair],
    concurrency: usize,
    secs: f64,
) -> Throughput {
    let mut result = Throughput::new(concurrency, 1);
    let pool = concurrency.to_string();
    let mut server = match Server::start(seed.command(host, &["--fork-pool", &pool])) {
        Ok(server) => server,
        Err(err) => {
            result
                .failures
                .push(format!("starting the fork pool: {err:#}"));
            return result;
        }
    };
    // Requests in flight, oldest first: what each must answer and when it was sent.
    let mut in_flight: VecDeque<(&str, Instant)> = VecDeque::with_capacity(concurrency);
    let mut sent = 0;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);
    loop {
        let sending = Instant::now() < deadline && result.failures.len() < MAX_FAILURES;
        while sending && in_flight.len() < concurrency {
            let (req, want) = nth(pairs, sent);
            sent += 1;
            if let Err(err) = server.send(req) {
                result.failures.push(format!("{err:#}"));
                return result;
            }
            in_flight.push_back((want, Instant::now()));
        }
        if in_flight.is_empty() {
            break;
        }
        let answer = match server.answer() {
            Ok(answer) => answer,
            Err(err) => {
                result.failures.push(format!("{err:#}"));
                return result;
            }
        };
        // Answers come in any order: retire the oldest request this one answers.
        match in_flight
            .iter()
            .position(|(want, _)| same_answer(&answer, want))
        {
            Some(i) => {
                let (_, at) = in_flight.remove(i).expect("found");
                result.latencies.push(at.elapsed());
                result.children += 1;
            }
            None => {
                in_flight.pop_front();
                result.failures.push(format!("wrong answer {answer:?}"));
            }
        }
    }
    result.elapsed = t0.elapsed();
    result
}

/// The last few lines of a command's stderr, on one line.
pub fn last_lines(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_cycling() {
        assert!(is_answer(r#"{"n": 1, "pid": 3}"#));
        assert!(!is_answer(r#"{"error": "KeyError: 'n'", "pid": 3}"#));
        assert!(!is_answer(""));
        let pairs = vec![
            ("a".to_owned(), "A".to_owned()),
            ("b".to_owned(), "B".to_owned()),
        ];
        assert_eq!(nth(&pairs, 0), ("a", "A"));
        assert_eq!(nth(&pairs, 3), ("b", "B"));
        let planned: Vec<_> = schedule(1, 3, &pairs).collect();
        assert_eq!(
            planned,
            vec![
                (r#"{"n": 1000}"#.to_owned(), None),
                ("a".to_owned(), Some("A")),
                ("b".to_owned(), Some("B")),
                ("a".to_owned(), Some("A")),
            ]
        );
        assert!(is_right(r#"{"n": 1, "pid": 2}"#, None));
        assert!(is_right(
            r#"{"n": 1, "pid": 2}"#,
            Some(r#"{"n": 1, "pid": 3}"#)
        ));
        assert!(!is_right(
            r#"{"n": 2, "pid": 2}"#,
            Some(r#"{"n": 1, "pid": 3}"#)
        ));
        assert_eq!(last_lines("1\n2\n\n3\n4\n"), "2 | 3 | 4");
    }
}
