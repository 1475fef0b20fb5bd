//! Judging a canary from its numbers over the sliding window (SPEC §3 `auto_rollback`).
//!
//! A canary is bad when, with at least `min_requests` requests in the window, its 5xx share is
//! above `error_rate` (with `relative_to_main`: above the main pool's share by more than
//! `error_rate` — compared only when the main pool itself had `min_requests`; otherwise the
//! absolute rule applies, so one error among three main requests cannot excuse a failing
//! canary), or its p99 (time to the upstream's response head) is above `latency_p99`. Client aborts (499) are not errors; the
//! proxy's own 502/504 for the canary are, since they are what its users got. The same verdict
//! gates a rollout's steps and, held for `for`, triggers the automatic rollback.

use std::time::Duration;
use switchyard_config::AnalysisConfig;

/// A pool's numbers over the window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Window {
    /// Finished requests.
    pub(crate) requests: u64,
    /// Of those, answered 5xx.
    pub(crate) errors: u64,
    /// Their 99th percentile latency, if any finished.
    pub(crate) p99: Option<Duration>,
    /// The time the numbers cover (less than the window just after a start).
    pub(crate) span: Duration,
}

impl Window {
    /// The 5xx share (0 without requests).
    pub(crate) fn ratio(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// Requests per second over the span.
    pub(crate) fn rate(&self) -> f64 {
        let secs = self.span.as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            self.requests as f64 / secs
        }
    }
}

/// Which threshold a bad canary crossed (`switchyard_rollbacks_total` reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The 5xx share.
    ErrorRate,
    /// The p99 latency.
    Latency,
}

impl Reason {
    /// The metric label: `auto_error_rate` or `auto_latency`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Reason::ErrorRate => "auto_error_rate",
            Reason::Latency => "auto_latency",
        }
    }
}

/// The verdict on a canary.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Too few requests in the window to say anything.
    TooFew {
        /// Requests in the window.
        have: u64,
        /// `min_requests`.
        need: u64,
    },
    /// Within the thresholds.
    Healthy,
    /// Above a threshold; `detail` says which, with the numbers.
    Bad {
        /// Which threshold.
        reason: Reason,
        /// E.g. "5xx 10.2% (51 of 500 requests in 60s) above 5.0%".
        detail: String,
    },
}

/// Judge `canary` (with `main`, the main pool over the same window).
pub(crate) fn judge(cfg: &AnalysisConfig, canary: &Window, main: &Window) -> Verdict {
    if canary.requests < cfg.min_requests.max(1) {
        return Verdict::TooFew {
            have: canary.requests,
            need: cfg.min_requests.max(1),
        };
    }
    let ratio = canary.ratio();
    let counted = format!(
        "{} of {} requests in {}",
        canary.errors,
        canary.requests,
        secs(canary.span)
    );
    if cfg.relative_to_main && main.requests >= cfg.min_requests.max(1) {
        let main_ratio = main.ratio();
        if ratio - main_ratio > cfg.error_rate {
            return Verdict::Bad {
                reason: Reason::ErrorRate,
                detail: format!(
                    "5xx {} ({counted}) is {} points above the main pool's {}, more than the allowed {}",
                    pct(ratio),
                    pct_points(ratio - main_ratio),
                    pct(main_ratio),
                    pct_points(cfg.error_rate)
                ),
            };
        }
    } else if ratio > cfg.error_rate {
        return Verdict::Bad {
            reason: Reason::ErrorRate,
            detail: format!(
                "5xx {} ({counted}) above {}",
                pct(ratio),
                pct(cfg.error_rate)
            ),
        };
    }
    if let (Some(limit), Some(p99)) = (cfg.latency_p99, canary.p99) {
        if p99 > limit {
            return Verdict::Bad {
                reason: Reason::Latency,
                detail: format!(
                    "p99 {} ({} requests in {}) above {}",
                    ms(p99),
                    canary.requests,
                    secs(canary.span),
                    ms(limit)
                ),
            };
        }
    }
    Verdict::Healthy
}

/// `0.1023` as `10.2%`.
pub(crate) fn pct(r: f64) -> String {
    format!("{:.1}%", r * 100.0)
}

fn pct_points(r: f64) -> String {
    format!("{:.1}", r * 100.0)
}

/// A latency as `850ms` or `1.20s`.
pub(crate) fn ms(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}

fn secs(d: Duration) -> String {
    format!("{:.0}s", d.as_secs_f64().max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AnalysisConfig {
        AnalysisConfig {
            error_rate: 0.05,
            relative_to_main: false,
            hold_for: Duration::from_secs(120),
            window: Duration::from_secs(60),
            min_requests: 20,
            latency_p99: None,
        }
    }

    fn w(requests: u64, errors: u64, p99_ms: u64) -> Window {
        Window {
            requests,
            errors,
            p99: Some(Duration::from_millis(p99_ms)),
            span: Duration::from_secs(60),
        }
    }

    #[test]
    fn too_few_requests_say_nothing_whatever_the_errors() {
        assert_eq!(
            judge(&cfg(), &w(19, 19, 5), &w(1000, 0, 5)),
            Verdict::TooFew { have: 19, need: 20 }
        );
    }

    #[test]
    fn the_error_share_is_compared_with_the_threshold_or_with_the_main_pool() {
        assert_eq!(
            judge(&cfg(), &w(100, 5, 5), &w(1000, 0, 5)),
            Verdict::Healthy
        );
        let Verdict::Bad { reason, detail } = judge(&cfg(), &w(500, 51, 5), &w(1000, 0, 5)) else {
            panic!("not bad");
        };
        assert_eq!(reason, Reason::ErrorRate);
        assert_eq!(detail, "5xx 10.2% (51 of 500 requests in 60s) above 5.0%");
        // An outage hitting both pools does not blame the canary with relative_to_main ...
        let rel = AnalysisConfig {
            relative_to_main: true,
            ..cfg()
        };
        assert_eq!(
            judge(&rel, &w(500, 200, 5), &w(1000, 380, 5)),
            Verdict::Healthy
        );
        // ... but a canary worse than the main pool by more than error_rate is bad.
        assert!(matches!(
            judge(&rel, &w(500, 100, 5), &w(1000, 100, 5)),
            Verdict::Bad {
                reason: Reason::ErrorRate,
                ..
            }
        ));
        // A main pool with too few requests is no reference: the absolute rule applies.
        assert!(matches!(
            judge(&rel, &w(500, 500, 5), &w(1, 1, 5)),
            Verdict::Bad {
                reason: Reason::ErrorRate,
                ..
            }
        ));
    }

    #[test]
    fn latency_counts_only_when_configured() {
        assert_eq!(
            judge(&cfg(), &w(100, 0, 5000), &w(100, 0, 5)),
            Verdict::Healthy
        );
        let slow = AnalysisConfig {
            latency_p99: Some(Duration::from_millis(800)),
            ..cfg()
        };
        assert_eq!(
            judge(&slow, &w(100, 0, 800), &w(100, 0, 5)),
            Verdict::Healthy
        );
        let Verdict::Bad { reason, detail } = judge(&slow, &w(100, 0, 1200), &w(100, 0, 5)) else {
            panic!("not bad");
        };
        assert_eq!(reason, Reason::Latency);
        assert_eq!(detail, "p99 1.20s (100 requests in 60s) above 800ms");
        assert_eq!(reason.label(), "auto_latency");
    }
}
