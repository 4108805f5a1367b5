//! Readers of the Azure Functions public traces (Azure/AzurePublicDataset, CC-BY 4.0).
//!
//! - 2019 (`invocations_per_function_md.anon.dNN.csv`): one row per function,
//!   `HashOwner,HashApp,HashFunction,Trigger,1,..,1440`, invocations per minute of a day.
//! - 2021 (`AzureFunctionsInvocationTraceForTwoWeeksJan2021.txt`): one row per invocation,
//!   `app,func,end_timestamp,duration` (seconds); it started at `end_timestamp - duration`.
//!
//! Both become a [`Trace`]: invocations per trace minute, which the arrivals replay.

use std::fmt;
use std::path::Path;

/// Seconds of trace time in one bin of a [`Trace`].
pub const BIN_SECS: f64 = 60.0;

/// Invocations per trace minute, for one function (or the sum of several).
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub counts: Vec<u64>,
}

impl Trace {
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Minutes `start..start + len` (clipped to the trace).
    pub fn window(&self, start: usize, len: Option<usize>) -> Trace {
        let start = start.min(self.counts.len());
        let end = len.map_or(self.counts.len(), |n| (start + n).min(self.counts.len()));
        Trace {
            counts: self.counts[start..end].to_vec(),
        }
    }
}

/// The two formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Azure2019,
    Azure2021,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "azure2019" => Ok(Format::Azure2019),
            "azure2021" => Ok(Format::Azure2021),
            _ => Err(format!(
                "unknown trace format {s:?}: azure2019 or azure2021"
            )),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Azure2019 => "azure2019",
            Format::Azure2021 => "azure2021",
        })
    }
}

/// Why a trace was refused; `line` is 1-based, the header being line 1.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the trace is empty (no header)")]
    Empty,
    #[error("line 1: not a {format} header: {found:?}")]
    Header { format: Format, found: String },
    #[error("line {line}: expected {expected} fields, found {found}")]
    Fields {
        line: usize,
        expected: usize,
        found: usize,
    },
    #[error("line {line}: field {field} ({name}): {value:?} is not {what}")]
    Value {
        line: usize,
        field: usize,
        name: String,
        value: String,
        what: &'static str,
    },
    #[error("line {line}: an empty id")]
    EmptyId { line: usize },
    #[error("row {row} asked for, the trace has {rows}")]
    NoRow { row: usize, rows: usize },
    #[error("the trace has no invocations")]
    NoInvocations,
}

/// Reads `path` in `format`, or in the format its header says.
pub fn read(path: &Path, format: Option<Format>, row: Option<usize>) -> Result<Trace, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let format = match format {
        Some(f) => f,
        None => detect(&text)?,
    };
    match format {
        Format::Azure2019 => parse_2019(&text, row),
        Format::Azure2021 => parse_2021(&text),
    }
}

/// The format whose header `text` starts with.
pub fn detect(text: &str) -> Result<Format, TraceError> {
    let header = text.lines().next().ok_or(TraceError::Empty)?.trim();
    if header.starts_with("HashOwner,") {
        Ok(Format::Azure2019)
    } else {
        Ok(Format::Azure2021)
    }
}

const HEADER_2019: [&str; 4] = ["HashOwner", "HashApp", "HashFunction", "Trigger"];
const MINUTES_2019: usize = 1440;

/// The 2019 format: every function's row (`row: None`, summed minute by minute) or the
/// `row`-th function (1-based, the header not counted).
pub fn parse_2019(text: &str, row: Option<usize>) -> Result<Trace, TraceError> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim_end()));
    let (_, header) = lines.next().ok_or(TraceError::Empty)?;
    let fields: Vec<&str> = header.split(',').collect();
    let minutes_ok = fields.len() == HEADER_2019.len() + MINUTES_2019
        && fields[HEADER_2019.len()..]
            .iter()
            .enumerate()
            .all(|(i, f)| f.parse::<usize>() == Ok(i + 1));
    if fields[..fields.len().min(4)] != HEADER_2019 || !minutes_ok {
        return Err(TraceError::Header {
            format: Format::Azure2019,
            found: header.chars().take(80).collect(),
        });
    }
    let mut counts = vec![0u64; MINUTES_2019];
    let mut rows = 0;
    for (line, text) in lines {
        if text.is_empty() {
            continue;
        }
        let fields: Vec<&str> = text.split(',').collect();
        if fields.len() != HEADER_2019.len() + MINUTES_2019 {
            return Err(TraceError::Fields {
                line,
                expected: HEADER_2019.len() + MINUTES_2019,
                found: fields.len(),
            });
        }
        if fields[..3].iter().any(|f| f.is_empty()) {
            return Err(TraceError::EmptyId { line });
        }
        rows += 1;
        let take = row.is_none_or(|r| r == rows);
        for (i, f) in fields[HEADER_2019.len()..].iter().enumerate() {
            let n: u64 = f.parse().map_err(|_| TraceError::Value {
                line,
                field: HEADER_2019.len() + i + 1,
                name: (i + 1).to_string(),
                value: f.to_string(),
                what: "a count of invocations",
            })?;
            if take {
                counts[i] += n;
            }
        }
    }
    match row {
        Some(r) if r == 0 || r > rows => Err(TraceError::NoRow { row: r, rows }),
        _ => Ok(Trace { counts }),
    }
}

const HEADER_2021: [&str; 4] = ["app", "func", "end_timestamp", "duration"];

/// The 2021 format: invocations binned by the minute they started in, from the first one's.
pub fn parse_2021(text: &str) -> Result<Trace, TraceError> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim_end()));
    let (_, header) = lines.next().ok_or(TraceError::Empty)?;
    let fields: Vec<&str> = header.split(',').map(str::trim).collect();
    if fields != HEADER_2021 {
        return Err(TraceError::Header {
            format: Format::Azure2021,
            found: header.chars().take(80).collect(),
        });
    }
    let mut starts = Vec::new();
    for (line, text) in lines {
        if text.is_empty() {
            continue;
        }
        let fields: Vec<&str> = text.split(',').map(str::trim).collect();
        if fields.len() != HEADER_2021.len() {
            return Err(TraceError::Fields {
                line,
                expected: HEADER_2021.len(),
                found: fields.len(),
            });
        }
        if fields[0].is_empty() || fields[1].is_empty() {
            return Err(TraceError::EmptyId { line });
        }
        let number = |field: usize| -> Result<f64, TraceError> {
            fields[field]
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| TraceError::Value {
                    line,
                    field: field + 1,
                    name: HEADER_2021[field].to_owned(),
                    value: fields[field].to_owned(),
                    what: "a number of seconds >= 0",
                })
        };
        let (end, duration) = (number(2)?, number(3)?);
        starts.push((end - duration).max(0.0));
    }
    let first = starts
        .iter()
        .copied()
        .reduce(f64::min)
        .ok_or(TraceError::NoInvocations)?;
    let mut counts = Vec::new();
    for s in starts {
        let bin = ((s - first) / BIN_SECS) as usize;
        if counts.len() <= bin {
            counts.resize(bin + 1, 0);
        }
        counts[bin] += 1;
    }
    Ok(Trace { counts })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn sample(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("traces")
            .join(name)
    }

    fn header_2019() -> String {
        let minutes: Vec<String> = (1..=1440).map(|m| m.to_string()).collect();
        format!(
            "HashOwner,HashApp,HashFunction,Trigger,{}",
            minutes.join(",")
        )
    }

    fn row_2019(counts: &[(usize, u64)]) -> String {
        let mut minutes = vec![0u64; 1440];
        for &(m, n) in counts {
            minutes[m] = n;
        }
        let minutes: Vec<String> = minutes.iter().map(u64::to_string).collect();
        format!("o1,a1,f1,http,{}", minutes.join(","))
    }

    #[test]
    fn the_2019_sample_reads_and_sums_its_rows() {
        let all = read(&sample("azure2019-sample.csv"), None, None).unwrap();
        assert_eq!(all.counts.len(), 1440);
        let text = std::fs::read_to_string(sample("azure2019-sample.csv")).unwrap();
        let rows = text.lines().count() - 1;
        let per_row: Vec<Trace> = (1..=rows)
            .map(|r| parse_2019(&text, Some(r)).unwrap())
            .collect();
        assert_eq!(all.total(), per_row.iter().map(Trace::total).sum::<u64>());
        assert!(all.total() > 0);
        assert!(matches!(
            parse_2019(&text, Some(rows + 1)),
            Err(TraceError::NoRow { .. })
        ));
    }

    #[test]
    fn the_2021_sample_bins_invocations_by_start_minute() {
        let t = read(&sample("azure2021-sample.csv"), None, None).unwrap();
        let text = std::fs::read_to_string(sample("azure2021-sample.csv")).unwrap();
        assert_eq!(t.total() as usize, text.lines().count() - 1);
        assert!(t.counts[0] > 0);
    }

    #[test]
    fn a_2021_row_starts_at_its_end_less_its_duration() {
        let t = parse_2021(
            "app,func,end_timestamp,duration\na,f,100.0,40.0\na,f,130,1\nb,g,185.5,0.5\n",
        )
        .unwrap();
        // Starts 60, 129 and 185: minutes 0, 1 and 2 from the first.
        assert_eq!(t.counts, [1, 1, 1]);
    }

    #[test]
    fn malformed_2019_rows_are_refused_with_their_line() {
        let good = row_2019(&[(0, 3), (5, 7)]);
        let t = parse_2019(&format!("{}\n{good}\n", header_2019()), None).unwrap();
        assert_eq!((t.counts[0], t.counts[5], t.total()), (3, 7, 10));

        let short = "o,a,f,http,1,2";
        let err = parse_2019(&format!("{}\n{good}\n{short}\n", header_2019()), None).unwrap_err();
        assert!(matches!(err, TraceError::Fields { line: 3, .. }), "{err}");
        assert!(err.to_string().starts_with("line 3:"), "{err}");

        let bad = good.replacen(",0,", ",x,", 1);
        let err =
            parse_2019(&format!("{}\n{good}\n{good}\n{bad}\n", header_2019()), None).unwrap_err();
        assert!(matches!(err, TraceError::Value { line: 4, .. }), "{err}");

        let negative = good.replacen(",0,", ",-1,", 1);
        let err = parse_2019(&format!("{}\n{negative}\n", header_2019()), None).unwrap_err();
        assert!(matches!(err, TraceError::Value { line: 2, .. }), "{err}");

        let no_id = good.replacen("o1,a1", "o1,", 1);
        let err = parse_2019(&format!("{}\n{no_id}\n", header_2019()), None).unwrap_err();
        assert!(matches!(err, TraceError::EmptyId { line: 2 }), "{err}");

        let err = parse_2019("HashOwner,HashApp,HashFunction,Trigger,1,2\n", None).unwrap_err();
        assert!(matches!(err, TraceError::Header { .. }), "{err}");
        assert!(matches!(parse_2019("", None), Err(TraceError::Empty)));
    }

    #[test]
    fn malformed_2021_rows_are_refused_with_their_line() {
        let h = "app,func,end_timestamp,duration";
        let err = parse_2021(&format!("{h}\na,f,1.0,0.5\na,f,2.0\n")).unwrap_err();
        assert!(matches!(err, TraceError::Fields { line: 3, .. }), "{err}");
        let err = parse_2021(&format!("{h}\na,f,soon,0.5\n")).unwrap_err();
        assert!(
            matches!(
                err,
                TraceError::Value {
                    line: 2,
                    field: 3,
                    ..
                }
            ),
            "{err}"
        );
        let err = parse_2021(&format!("{h}\na,f,1,0.5\na,f,1,-2\n")).unwrap_err();
        assert!(
            matches!(
                err,
                TraceError::Value {
                    line: 3,
                    field: 4,
                    ..
                }
            ),
            "{err}"
        );
        let err = parse_2021(&format!("{h}\n,f,1,0.5\n")).unwrap_err();
        assert!(matches!(err, TraceError::EmptyId { line: 2 }), "{err}");
        let err = parse_2021("when,what\n").unwrap_err();
        assert!(matches!(err, TraceError::Header { .. }), "{err}");
        assert!(matches!(
            parse_2021(&format!("{h}\n")),
            Err(TraceError::NoInvocations)
        ));
    }

    #[test]
    fn a_window_clips_to_the_trace() {
        let t = Trace {
            counts: vec![1, 2, 3, 4],
        };
        assert_eq!(t.window(1, Some(2)).counts, [2, 3]);
        assert_eq!(t.window(3, Some(5)).counts, [4]);
        assert_eq!(t.window(9, None).counts, Vec::<u64>::new());
    }
}
