//! Workflows on the platform (issue 21, part 3; docs/workflows.md, "On the platform"): a
//! declarative DAG of stages that the platform runs, fanning out and in.
//!
//! A stage runs `function` (a deployed function: each instance a call of it, a child of its
//! seed) or forks from an earlier stage (`fork`): that stage's one process prepared itself
//! (`mitosis.fork_prepare()`, through its channel: [`crate::channel`]) and this stage's
//! instances are its children, resumed on any host, each told its index and argument by the
//! child header on stdin, so that `fork_prepare` returns in them as it does anywhere. A stage
//! runs once every stage it is `after` (and the one it forks from) is done, with their results
//! (fan-in); it runs `fan_out` instances, or one per item of `inputs`, at once (fan-out).
//!
//! Every instance reads one JSON document (a function stage's on stdin, a fork stage's as its
//! `arg`): `{"workflow", "run_id", "stage", "index", "count", "input", "after"}`, where
//! `input` is the stage's `inputs[index]` if it has `inputs`, else the run's request body
//! (JSON if it parses, else a string, `null` if empty), and `after` maps each stage it is after
//! to the results of its instances, in order. A result is the instance's answer as JSON if it
//! parses, else a string.
//!
//! A run ends at its first failure: every instance still running is killed (its call
//! abandoned), and every seed the run made is dropped, whatever happened. The error names the
//! stage and why.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::channel::{Channel, RunSeeds};
use crate::error::{ApiError, CallError, StoreError};
use crate::model::{Func, check_name};
use crate::seeds::Seed;
use crate::store::Store;
use crate::{Platform, http_contract};

/// The most stages a workflow has.
pub const MAX_STAGES: usize = 32;
/// The most instances a stage runs.
pub const MAX_FAN_OUT: usize = 64;
/// The most instances of one run whose calls are under way at once (stages that may run
/// together wait for room): each holds blocking threads of the platform's shared pool for
/// its resume and its wait, which one run must not take all of.
pub const MAX_RUN_INSTANCES: usize = 2 * MAX_FAN_OUT;

/// The body of `POST /v2/workflows`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowInput {
    pub name: Option<String>,
    pub stages: Option<Vec<StageInput>>,
}

/// One stage as given.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageInput {
    pub name: Option<String>,
    /// A function's id, or `APP/FN`.
    pub function: Option<String>,
    /// An earlier stage, of one instance, whose process prepared itself.
    pub fork: Option<String>,
    #[serde(default)]
    pub after: Vec<String>,
    /// How many instances (1 by default); or `inputs`, one instance per item.
    pub fan_out: Option<Value>,
    pub inputs: Option<Vec<Value>>,
}

/// A workflow as the platform keeps it (in the store, as its JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workflow {
    pub id: String,
    pub name: String,
    pub stages: Vec<Stage>,
    pub created_at: String,
}

/// A checked stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    /// As given (`function` stages).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// The function it resolved to (a fork stage's: its source's).
    pub fn_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fork: Option<String>,
    pub after: Vec<String>,
    /// How many instances run.
    pub fan_out: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Vec<Value>>,
}

impl Stage {
    /// The stages this one waits for: those it is after, and the one it forks from.
    pub fn needs(&self) -> impl Iterator<Item = &String> {
        self.after.iter().chain(self.fork.iter())
    }
}

fn bad(message: String) -> ApiError {
    ApiError::bad_request(message)
}

/// Checks a workflow's shape: names, references, bounds, no cycle. Functions are resolved
/// by [`resolve`]; until then `fn_id` is empty.
pub fn check(input: WorkflowInput) -> Result<(String, Vec<Stage>), ApiError> {
    let name = input.name.unwrap_or_default();
    check_name(&name, "Workflow")?;
    let given = input
        .stages
        .ok_or_else(|| bad("stages: a workflow needs at least one stage".into()))?;
    if given.is_empty() || given.len() > MAX_STAGES {
        return Err(bad(format!(
            "stages: a workflow has 1 to {MAX_STAGES} stages, not {}",
            given.len()
        )));
    }
    let mut index_of: HashMap<String, usize> = HashMap::new();
    for (i, s) in given.iter().enumerate() {
        let n = s.name.clone().unwrap_or_default();
        check_name(&n, &format!("stages[{i}].name: Stage"))?;
        if let Some(j) = index_of.insert(n.clone(), i) {
            return Err(bad(format!(
                "stages[{i}].name: {n:?} is stages[{j}]'s name already"
            )));
        }
    }
    let mut stages = Vec::with_capacity(given.len());
    for (i, s) in given.into_iter().enumerate() {
        let name = s.name.unwrap_or_default();
        match (&s.function, &s.fork) {
            (Some(_), Some(_)) => {
                return Err(bad(format!(
                    "stages[{i}]: give `function` or `fork`, not both"
                )));
            }
            (None, None) => {
                return Err(bad(format!(
                    "stages[{i}]: give `function` (a function's id or APP/FN) or `fork` (an \
                     earlier stage whose process prepared itself)"
                )));
            }
            (Some(f), None) if f.is_empty() => {
                return Err(bad(format!("stages[{i}].function: empty")));
            }
            _ => {}
        }
        let fan_out = match (&s.fan_out, &s.inputs) {
            (Some(_), Some(_)) => {
                return Err(bad(format!(
                    "stages[{i}]: give `fan_out` or `inputs`, not both"
                )));
            }
            (Some(v), None) => match v.as_u64() {
                Some(n) if (1..=MAX_FAN_OUT as u64).contains(&n) => n as usize,
                _ => {
                    return Err(bad(format!(
                        "stages[{i}].fan_out: must be an integer from 1 to {MAX_FAN_OUT}, not {v}"
                    )));
                }
            },
            (None, Some(items)) if (1..=MAX_FAN_OUT).contains(&items.len()) => items.len(),
            (None, Some(items)) => {
                return Err(bad(format!(
                    "stages[{i}].inputs: must hold 1 to {MAX_FAN_OUT} items, not {}",
                    items.len()
                )));
            }
            (None, None) => 1,
        };
        let mut after = Vec::new();
        for a in s.after {
            if !index_of.contains_key(&a) {
                return Err(bad(format!("stages[{i}].after: no stage named {a:?}")));
            }
            if a == name {
                return Err(bad(format!(
                    "stages[{i}].after: a stage cannot wait for itself"
                )));
            }
            if !after.contains(&a) {
                after.push(a);
            }
        }
        if let Some(from) = &s.fork {
            if !index_of.contains_key(from) {
                return Err(bad(format!("stages[{i}].fork: no stage named {from:?}")));
            }
            if *from == name {
                return Err(bad(format!(
                    "stages[{i}].fork: a stage cannot fork from itself"
                )));
            }
        }
        stages.push(Stage {
            name,
            function: s.function,
            fn_id: String::new(),
            fork: s.fork,
            after,
            fan_out,
            inputs: s.inputs,
        });
    }
    for (i, s) in stages.iter().enumerate() {
        if let Some(from) = &s.fork {
            let source = &stages[index_of[from]];
            if source.fan_out != 1 {
                return Err(bad(format!(
                    "stages[{i}].fork: stage {from:?} runs {} instances; a stage forks from a \
                     stage of one",
                    source.fan_out
                )));
            }
        }
    }
    if let Some(cycle) = find_cycle(&stages, &index_of) {
        return Err(bad(format!(
            "stages: `after` and `fork` make a cycle: {}",
            cycle.join(" -> ")
        )));
    }
    Ok((name, stages))
}

/// A cycle among the stages' needs, as names (the first repeated at the end), if any.
fn find_cycle(stages: &[Stage], index_of: &HashMap<String, usize>) -> Option<Vec<String>> {
    // 0: not seen, 1: on the path, 2: done.
    let mut state = vec![0u8; stages.len()];
    let mut path = Vec::new();
    fn visit(
        i: usize,
        stages: &[Stage],
        index_of: &HashMap<String, usize>,
        state: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<Vec<String>> {
        state[i] = 1;
        path.push(i);
        for need in stages[i].needs() {
            let j = index_of[need];
            if state[j] == 1 {
                let at = path.iter().position(|&k| k == j).expect("on the path");
                let mut cycle: Vec<String> =
                    path[at..].iter().map(|&k| stages[k].name.clone()).collect();
                cycle.push(stages[j].name.clone());
                // Written in the order stages run: a needed stage first.
                cycle.reverse();
                return Some(cycle);
            }
            if state[j] == 0 {
                if let Some(c) = visit(j, stages, index_of, state, path) {
                    return Some(c);
                }
            }
        }
        path.pop();
        state[i] = 2;
        None
    }
    (0..stages.len()).find_map(|i| {
        if state[i] == 0 {
            visit(i, stages, index_of, &mut state, &mut path)
        } else {
            None
        }
    })
}

/// Why a stage's function is not one it can run.
#[derive(Debug, thiserror::Error)]
pub enum FunctionRefError {
    #[error("no function {0:?} (give its id, or APP/FN)")]
    NotFound(String),
    #[error(
        "function {0:?} follows the HTTP contract; workflow stages run functions of the \
         stdin/stdout contract"
    )]
    Http(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// The function a stage names: its id, or `APP/FN`.
pub async fn find_function(store: &Store, reference: &str) -> Result<Func, FunctionRefError> {
    let found = match reference.split_once('/') {
        Some((app, name)) => match store.apps(Some(app.to_owned())).await?.pop() {
            Some(app) => store.fns(Some(app.id), Some(name.to_owned())).await?.pop(),
            None => None,
        },
        None => store.func(reference.to_owned()).await?,
    };
    let f = found.ok_or_else(|| FunctionRefError::NotFound(reference.to_owned()))?;
    if http_contract::is_http(&f.annotations) {
        return Err(FunctionRefError::Http(reference.to_owned()));
    }
    Ok(f)
}

/// Resolves every stage's function (a fork stage's is its source's), as `fn_id`.
pub async fn resolve(store: &Store, stages: &mut [Stage]) -> Result<(), ApiError> {
    for (i, s) in stages.iter_mut().enumerate() {
        if let Some(reference) = &s.function {
            let f = find_function(store, reference).await.map_err(|e| match e {
                FunctionRefError::Store(e) => ApiError::from(e),
                e => bad(format!("stages[{i}].function: {e}")),
            })?;
            s.fn_id = f.id;
        }
    }
    // A fork's function is its source's, which may be a fork itself: no cycle, so this ends.
    loop {
        let unresolved: Vec<usize> = (0..stages.len())
            .filter(|&i| stages[i].fn_id.is_empty())
            .collect();
        if unresolved.is_empty() {
            return Ok(());
        }
        let mut progress = false;
        for i in unresolved {
            let from = stages[i].fork.clone().expect("only forks are unresolved");
            let source = stages
                .iter()
                .find(|s| s.name == from)
                .map(|s| s.fn_id.clone())
                .unwrap_or_default();
            if !source.is_empty() {
                stages[i].fn_id = source;
                progress = true;
            }
        }
        if !progress {
            return Err(bad("stages: a fork with no function to fork".into()));
        }
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// An instance of a stage failed (its function failed, timed out, or no host ran it).
    #[error("stage {stage} failed (instance {index} of {count}): {source}")]
    Instance {
        stage: String,
        index: usize,
        count: usize,
        #[source]
        source: CallError,
    },
    /// A stage forks from one whose process never prepared itself.
    #[error(
        "stage {stage} finished without preparing itself (its process did not call \
         fork_prepare, or the prepare failed), and stage {fork} forks from it"
    )]
    NotPrepared { stage: String, fork: String },
    /// A stage's function is gone (deleted since), or no longer one a stage can run.
    #[error("stage {stage}: {source}")]
    Function {
        stage: String,
        #[source]
        source: FunctionRefError,
    },
    /// A stage's task ended without an answer (a panic).
    #[error("stage {0} failed: its task ended abnormally")]
    Lost(String),
}

impl WorkflowError {
    /// The stage that failed.
    pub fn stage(&self) -> &str {
        match self {
            WorkflowError::Instance { stage, .. }
            | WorkflowError::NotPrepared { stage, .. }
            | WorkflowError::Function { stage, .. }
            | WorkflowError::Lost(stage) => stage,
        }
    }

    /// The instance that failed, if one did.
    pub fn index(&self) -> Option<usize> {
        match self {
            WorkflowError::Instance { index, .. } => Some(*index),
            _ => None,
        }
    }

    /// A short name of what went wrong, for programs.
    pub fn kind(&self) -> &'static str {
        match self {
            WorkflowError::Instance { source, .. } => match source {
                CallError::TimedOut(_) => "timed_out",
                CallError::Crashed(_) => "failed",
                CallError::NoHost(_) => "no_host",
                CallError::OutputTooLarge(_) => "output_too_large",
                CallError::BadInput(_) => "bad_input",
                _ => "platform",
            },
            WorkflowError::NotPrepared { .. } => "not_prepared",
            WorkflowError::Function { .. } => "function",
            WorkflowError::Lost(_) => "platform",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            WorkflowError::Instance { source, .. } => ApiError::status_of(source),
            WorkflowError::NotPrepared { .. } => StatusCode::BAD_GATEWAY,
            WorkflowError::Function {
                source: FunctionRefError::Store(_),
                ..
            } => StatusCode::SERVICE_UNAVAILABLE,
            WorkflowError::Function {
                source: FunctionRefError::NotFound(_),
                ..
            } => StatusCode::NOT_FOUND,
            // Changed since to a function no stage can run.
            WorkflowError::Function { .. } => StatusCode::CONFLICT,
            WorkflowError::Lost(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A run that failed: why, and what it did before.
#[derive(Debug)]
pub struct RunFailure {
    pub run_id: String,
    pub error: WorkflowError,
    /// The stages that had finished.
    pub completed: Vec<String>,
    pub elapsed_ms: f64,
    /// Seeds the run's processes made of themselves (all dropped).
    pub seeds_made: usize,
}

impl RunFailure {
    /// The answer's body: Fn's `message`, and which stage failed and why.
    pub fn body(&self) -> Value {
        json!({
            "message": self.error.to_string(),
            "stage": self.error.stage(),
            "index": self.error.index(),
            "kind": self.error.kind(),
            "run_id": self.run_id,
            "completed": self.completed,
            "elapsed_ms": self.elapsed_ms,
            "seeds_made": self.seeds_made,
        })
    }
}

/// One instance of a stage, as it ran.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceReport {
    pub index: usize,
    /// The host that ran it.
    pub host: String,
    pub elapsed_ms: f64,
    /// Whether its process prepared itself (a later stage may fork from it).
    pub prepared: bool,
}

/// A stage, as it ran.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub name: String,
    pub fn_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fork: Option<String>,
    /// From the run's start to the stage's start, and the stage's own time.
    pub started_ms: f64,
    pub elapsed_ms: f64,
    /// Its instances' answers, in order (JSON if they parse, else strings).
    pub results: Vec<Value>,
    pub instances: Vec<InstanceReport>,
}

/// A run that succeeded.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub workflow: String,
    pub name: String,
    pub run_id: String,
    pub elapsed_ms: f64,
    /// Every stage, in the order they finished.
    pub stages: Vec<StageReport>,
    /// Seeds the run's processes made of themselves (all dropped at its end).
    pub seeds_made: usize,
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// An answer as a result: JSON if it parses, else text.
fn result_of(output: &[u8]) -> Value {
    serde_json::from_slice(output)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(output).into_owned()))
}

/// What every instance of a run shares.
struct RunContext {
    workflow: String,
    run_id: String,
    input: Value,
    seeds: Arc<RunSeeds>,
    t0: Instant,
    /// Room for [`MAX_RUN_INSTANCES`] calls at once.
    slots: Arc<tokio::sync::Semaphore>,
}

impl Platform {
    /// Runs workflow `wf` with `input` (the request's body); every seed its processes made
    /// is dropped before this returns, and on failure every instance still running was
    /// killed.
    pub async fn run_workflow(
        self: &Arc<Self>,
        wf: &Workflow,
        input: &[u8],
    ) -> Result<RunReport, RunFailure> {
        let run_id = crate::ids::ulid();
        let input = if input.is_empty() {
            Value::Null
        } else {
            result_of(input)
        };
        let ctx = Arc::new(RunContext {
            workflow: wf.name.clone(),
            run_id: run_id.clone(),
            input,
            seeds: RunSeeds::new(self.hosts.clone()),
            t0: Instant::now(),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_RUN_INSTANCES)),
        });
        // Should this future be dropped (the client went away), the seeds still go.
        let _cleanup = crate::channel::DropOnExit(ctx.seeds.clone());
        let span = tracing::info_span!("workflow", workflow = %wf.id, %run_id);
        let mut done = Vec::new();
        let ran = tracing::Instrument::instrument(self.run_stages(wf, &ctx, &mut done), span).await;
        let seeds_made = ctx.seeds.len();
        ctx.seeds.drop_all().await;
        let elapsed_ms = ms(ctx.t0.elapsed());
        match ran {
            Ok(()) => Ok(RunReport {
                workflow: wf.id.clone(),
                name: wf.name.clone(),
                run_id,
                elapsed_ms,
                stages: done,
                seeds_made,
            }),
            Err(error) => {
                tracing::info!(workflow = %wf.id, %run_id, "workflow failed: {error}");
                Err(RunFailure {
                    run_id,
                    error,
                    completed: done.into_iter().map(|s| s.name).collect(),
                    elapsed_ms,
                    seeds_made,
                })
            }
        }
    }

    async fn run_stages(
        self: &Arc<Self>,
        wf: &Workflow,
        ctx: &Arc<RunContext>,
        done: &mut Vec<StageReport>,
    ) -> Result<(), WorkflowError> {
        // Functions as they are now (one may have been changed or deleted since).
        let mut funcs: HashMap<String, Func> = HashMap::new();
        for s in &wf.stages {
            if funcs.contains_key(&s.fn_id) {
                continue;
            }
            let f = find_function(&self.store, &s.fn_id)
                .await
                .map_err(|source| WorkflowError::Function {
                    stage: s.name.clone(),
                    source,
                })?;
            funcs.insert(s.fn_id.clone(), f);
        }
        let mut started = BTreeSet::new();
        let mut running = tokio::task::JoinSet::new();
        loop {
            let finished: BTreeSet<&str> = done.iter().map(|s| s.name.as_str()).collect();
            for s in &wf.stages {
                if started.contains(&s.name) || !s.needs().all(|n| finished.contains(n.as_str())) {
                    continue;
                }
                let f = funcs[&s.fn_id].clone();
                let from = match &s.fork {
                    Some(source) => match ctx.seeds.of(source, 0) {
                        Some(made) => Some(seed_of(&made, &f)),
                        None => {
                            running.abort_all();
                            while running.join_next().await.is_some() {}
                            return Err(WorkflowError::NotPrepared {
                                stage: source.clone(),
                                fork: s.name.clone(),
                            });
                        }
                    },
                    None => None,
                };
                let after: BTreeMap<String, Vec<Value>> = s
                    .after
                    .iter()
                    .chain(s.fork.iter())
                    .filter_map(|n| done.iter().find(|d| d.name == *n))
                    .map(|d| (d.name.clone(), d.results.clone()))
                    .collect();
                started.insert(s.name.clone());
                let (p, s, ctx) = (self.clone(), s.clone(), ctx.clone());
                running.spawn(async move {
                    let name = s.name.clone();
                    (name, p.run_stage(s, f, from, after, ctx).await)
                });
            }
            match running.join_next().await {
                None => return Ok(()),
                Some(Ok((_, Ok(report)))) => done.push(report),
                Some(other) => {
                    // The first failure ends the run: every other instance is killed (its
                    // call dropped) before the run's seeds go.
                    running.abort_all();
                    while running.join_next().await.is_some() {}
                    return Err(match other {
                        Ok((_, Err(e))) => e,
                        Ok((name, Ok(_))) => WorkflowError::Lost(name),
                        Err(_) => WorkflowError::Lost("?".into()),
                    });
                }
            }
        }
    }

    async fn run_stage(
        self: Arc<Self>,
        stage: Stage,
        f: Func,
        from: Option<Seed>,
        after: BTreeMap<String, Vec<Value>>,
        ctx: Arc<RunContext>,
    ) -> Result<StageReport, WorkflowError> {
        let t0 = Instant::now();
        let started_ms = ms(ctx.t0.elapsed());
        let count = stage.fan_out;
        let after = Arc::new(after);
        let mut instances = tokio::task::JoinSet::new();
        for index in 0..count {
            let input = match &stage.inputs {
                Some(items) => items[index].clone(),
                None => ctx.input.clone(),
            };
            let doc = json!({
                "workflow": ctx.workflow,
                "run_id": ctx.run_id,
                "stage": stage.name,
                "index": index,
                "count": count,
                "input": input,
                "after": *after,
            });
            let doc = serde_json::to_vec(&doc).expect("JSON values serialize");
            // A fork's child reads its role header first; its argument is the document.
            let stdin = match &from {
                Some(_) => mitosis_client::workflow::child_header(index as u64, &doc, None),
                None => doc,
            };
            let call = crate::StageCall {
                channel: Channel {
                    seeds: ctx.seeds.clone(),
                    stage: stage.name.clone(),
                    index,
                    timeout: std::time::Duration::from_secs(u64::from(f.timeout)),
                },
                from: from.clone(),
            };
            let (p, f, name) = (self.clone(), f.clone(), stage.name.clone());
            let slots = ctx.slots.clone();
            instances.spawn(async move {
                // Never closed: acquiring only waits for room.
                let _slot = slots.acquire_owned().await;
                let t = Instant::now();
                let invoked = p.invoke_stage(&f, stdin.into(), call).await;
                (index, invoked, ms(t.elapsed()), name)
            });
        }
        let mut results = vec![Value::Null; count];
        let mut reports = Vec::with_capacity(count);
        while let Some(joined) = instances.join_next().await {
            let failed = match joined {
                Ok((index, Ok(invoked), elapsed_ms, _)) => {
                    results[index] = result_of(&invoked.answer.output);
                    reports.push(InstanceReport {
                        index,
                        host: invoked.host,
                        elapsed_ms,
                        prepared: ctx.seeds.of(&stage.name, index).is_some(),
                    });
                    continue;
                }
                Ok((index, Err(source), _, name)) => WorkflowError::Instance {
                    stage: name,
                    index,
                    count,
                    source,
                },
                Err(_) => WorkflowError::Lost(stage.name.clone()),
            };
            // Its siblings are killed (their calls dropped) before the failure goes up.
            instances.abort_all();
            while instances.join_next().await.is_some() {}
            return Err(failed);
        }
        reports.sort_by_key(|r| r.index);
        Ok(StageReport {
            name: stage.name,
            fn_id: f.id,
            fork: stage.fork,
            started_ms,
            elapsed_ms: ms(t0.elapsed()),
            results,
            instances: reports,
        })
    }
}

/// The seed a stage's process made, as the scheduler sees seeds.
fn seed_of(made: &crate::channel::MadeSeed, f: &Func) -> Seed {
    let parsed: Option<mitosis_descriptor::Handle> = made.handle.parse().ok();
    Seed {
        host: made.host,
        handle: made.handle.clone(),
        image: f.image.clone(),
        seed_id: parsed.as_ref().map_or(0, |h| h.seed_id),
        seed_addr: parsed.map_or_else(String::new, |h| h.host.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(v: Value) -> WorkflowInput {
        serde_json::from_value(v).expect("parses")
    }

    fn refused(v: Value) -> String {
        check(input(v)).expect_err("refused").message
    }

    #[test]
    fn a_dag_checks_and_keeps_its_stages() {
        let (name, stages) = check(input(json!({"name": "finra", "stages": [
            {"name": "load", "function": "app/loader"},
            {"name": "validate", "fork": "load", "inputs": [1, 2, 3]},
            {"name": "report", "function": "01ABC", "after": ["validate", "validate"]},
        ]})))
        .unwrap();
        assert_eq!(name, "finra");
        assert_eq!(stages[1].fan_out, 3);
        assert_eq!(stages[2].after, ["validate"]);
        assert_eq!(stages[1].needs().collect::<Vec<_>>(), ["load"]);
    }

    #[test]
    fn malformed_dags_are_refused_naming_the_field() {
        let cases = [
            (
                json!({"stages": [{"name": "a", "function": "f"}]}),
                "Missing Workflow name",
            ),
            (json!({"name": "w"}), "stages:"),
            (
                json!({"name": "w", "stages": []}),
                "stages: a workflow has 1 to",
            ),
            (
                json!({"name": "w", "stages": [{"name": "a", "function": "f"}, {"name": "a", "function": "f"}]}),
                "stages[1].name",
            ),
            (
                json!({"name": "w", "stages": [{"name": "a"}]}),
                "stages[0]: give `function`",
            ),
            (
                json!({"name": "w", "stages": [{"name": "a", "function": "f", "fork": "a"}]}),
                "not both",
            ),
            (
                json!({"name": "w", "stages": [{"name": "a", "function": "f", "after": ["b"]}]}),
                "stages[0].after: no stage named \"b\"",
            ),
            (
                json!({"name": "w", "stages": [{"name": "a", "function": "f", "fan_out": 0}]}),
                "stages[0].fan_out",
            ),
            (
                json!({"name": "w", "stages": [{"name": "a", "function": "f", "fan_out": 65}]}),
                "stages[0].fan_out",
            ),
            (
                json!({"name": "w", "stages": [{"name": "a", "function": "f", "fan_out": "3"}]}),
                "stages[0].fan_out",
            ),
            (
                json!({"name": "w", "stages": [{"name": "a", "function": "f", "inputs": []}]}),
                "stages[0].inputs",
            ),
            (
                json!({"name": "w", "stages": [{"name": "a", "function": "f", "inputs": [1], "fan_out": 1}]}),
                "not both",
            ),
            (
                json!({"name": "w", "stages": [{"name": "a", "function": "f", "fan_out": 2},
                                               {"name": "b", "fork": "a"}]}),
                "stages[1].fork: stage \"a\" runs 2 instances",
            ),
            (
                json!({"name": "w", "stages": [{"name": "b", "fork": "z"}]}),
                "stages[0].fork: no stage named \"z\"",
            ),
            (
                json!({"name": "w", "stages": [{"name": "a", "function": "f", "after": ["c"]},
                                               {"name": "b", "function": "f", "after": ["a"]},
                                               {"name": "c", "fork": "b"}]}),
                "cycle",
            ),
            (
                json!({"name": "w", "stages": [{"name": "a", "function": "f", "after": ["a"]}]}),
                "itself",
            ),
        ];
        for (body, want) in cases {
            let why = refused(body.clone());
            assert!(why.contains(want), "{body}: {why:?} lacks {want:?}");
        }
        let cycle = refused(json!({"name": "w", "stages": [
            {"name": "a", "function": "f", "after": ["b"]},
            {"name": "b", "function": "f", "after": ["a"]}]}));
        assert!(
            cycle.ends_with("a -> b -> a") || cycle.ends_with("b -> a -> b"),
            "{cycle}"
        );
        // Unknown fields are named by the parser.
        let typo: Result<WorkflowInput, _> =
            serde_json::from_value(json!({"name": "w", "stages": [{"name": "a", "fanout": 2}]}));
        assert!(typo.unwrap_err().to_string().contains("fanout"));
    }
}
