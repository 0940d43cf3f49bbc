//! Spend budgets (docs/budgets.md): what each budgeted tenant spent in the current
//! calendar period (UTC day, ISO week from Monday, month), kept per tenant
//! name and period so a reload never loses it, and, without Redis, in a
//! state file written atomically at least every 5 s and at shutdown.
//!
//! Time comes from a `Clock`, so tests roll periods over without sleeping.
//! The calendar arithmetic is the classic days-from-civil conversion
//! (Howard Hinnant's algorithm): a few lines with no time zone in sight,
//! where a date crate would bring a time-zone database Sluice never uses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::BudgetPeriod;

/// Wall-clock time in whole seconds since the Unix epoch, UTC.
pub(crate) trait Clock: Send + Sync {
    fn now(&self) -> i64;
}

/// The system's clock.
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }
}

/// One calendar period: the name spend is recorded under, and when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Span {
    /// `day:2026-11-30`, `week:2026-11-30` (its Monday), `month:2026-11`.
    pub(crate) key: String,
    /// The first second of the next period.
    pub(crate) end: i64,
}

const DAY: i64 = 86_400;

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day since 1970-01-01.
pub(super) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The period of kind `period` that contains `unix`.
pub(crate) fn span(period: BudgetPeriod, unix: i64) -> Span {
    let days = unix.div_euclid(DAY);
    match period {
        BudgetPeriod::Day => {
            let (y, m, d) = civil_from_days(days);
            Span {
                key: format!("day:{y:04}-{m:02}-{d:02}"),
                end: (days + 1) * DAY,
            }
        }
        BudgetPeriod::Week => {
            // 1970-01-01 was a Thursday: Monday is 3 days before it.
            let monday = days - (days + 3).rem_euclid(7);
            let (y, m, d) = civil_from_days(monday);
            Span {
                key: format!("week:{y:04}-{m:02}-{d:02}"),
                end: (monday + 7) * DAY,
            }
        }
        BudgetPeriod::Month => {
            let (y, m, _) = civil_from_days(days);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            Span {
                key: format!("month:{y:04}-{m:02}"),
                end: days_from_civil(ny, nm, 1) * DAY,
            }
        }
    }
}

/// Whether `key` names the period of its kind that contains `unix`.
fn is_current(key: &str, unix: i64) -> bool {
    let kind = match key.split_once(':').map(|(k, _)| k) {
        Some("day") => BudgetPeriod::Day,
        Some("week") => BudgetPeriod::Week,
        Some("month") => BudgetPeriod::Month,
        _ => return false,
    };
    span(kind, unix).key == key
}

/// What one tenant spent, by period. A per-tenant lock, held for a few
/// instructions: tenants never contend with each other.
#[derive(Default)]
pub(crate) struct Spend {
    state: Mutex<SpendState>,
}

#[derive(Default)]
struct SpendState {
    /// USD by period key.
    spent: HashMap<String, f64>,
}

impl Spend {
    fn lock(&self) -> std::sync::MutexGuard<'_, SpendState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn spent(&self, key: &str) -> f64 {
        self.lock().spent.get(key).copied().unwrap_or(0.0)
    }

    pub(crate) fn add(&self, key: &str, usd: f64) {
        *self.lock().spent.entry(key.to_string()).or_insert(0.0) += usd;
    }

    /// What the fleet says was spent: this replica's view never goes below.
    pub(crate) fn observe(&self, key: &str, fleet: f64) {
        let mut s = self.lock();
        let v = s.spent.entry(key.to_string()).or_insert(0.0);
        if fleet > *v {
            *v = fleet;
        }
    }
}

/// Every budgeted tenant's spend, by tenant name (so a reload that makes a
/// new `TenantLimits` keeps it), and the state file.
pub(crate) struct Budgets {
    pub(crate) clock: Arc<dyn Clock>,
    spends: Mutex<HashMap<String, Arc<Spend>>>,
    file: Option<PathBuf>,
    dirty: AtomicBool,
}

/// The state file: `{"version":1,"spend":{"tenant":{"month:2026-11":1.25}}}`.
#[derive(serde::Serialize, serde::Deserialize)]
struct StateFile {
    version: u32,
    spend: HashMap<String, HashMap<String, f64>>,
}

impl Budgets {
    /// Opens the state file (`None`: memory only). A missing file starts
    /// empty and is created; one that cannot be read or parsed is an error
    /// naming it, never silently zeroed.
    pub(crate) fn open(file: Option<&Path>, clock: Arc<dyn Clock>) -> Result<Budgets, String> {
        let budgets = Budgets {
            clock,
            spends: Mutex::new(HashMap::new()),
            file: file.map(Path::to_path_buf),
            dirty: AtomicBool::new(false),
        };
        let Some(path) = file else { return Ok(budgets) };
        match std::fs::read(path) {
            Ok(bytes) => {
                let state: StateFile = serde_json::from_slice(&bytes).map_err(|e| {
                    format!(
                        "budgets.state_path {}: not a spend state file ({e})",
                        path.display()
                    )
                })?;
                if state.version != 1 {
                    return Err(format!(
                        "budgets.state_path {}: unknown version {}",
                        path.display(),
                        state.version
                    ));
                }
                let now = budgets.clock.now();
                let mut spends = budgets.lock();
                for (tenant, periods) in state.spend {
                    let spend = Spend::default();
                    for (key, usd) in periods {
                        // Spend of an earlier period is ignored.
                        if is_current(&key, now) && usd.is_finite() && usd > 0.0 {
                            spend.add(&key, usd);
                        }
                    }
                    spends.insert(tenant, Arc::new(spend));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                budgets.dirty.store(true, Ordering::Release);
                budgets
                    .write(path)
                    .map_err(|e| format!("budgets.state_path {}: {e}", path.display()))?;
            }
            Err(e) => {
                return Err(format!("budgets.state_path {}: {e}", path.display()));
            }
        }
        Ok(budgets)
    }

    /// Spend in memory only.
    pub(crate) fn memory(clock: Arc<dyn Clock>) -> Budgets {
        Budgets {
            clock,
            spends: Mutex::new(HashMap::new()),
            file: None,
            dirty: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Spend>>> {
        self.spends.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The spend of `tenant` (made at config load, never per request).
    pub(crate) fn spend(&self, tenant: &str) -> Arc<Spend> {
        Arc::clone(self.lock().entry(tenant.to_string()).or_default())
    }

    pub(crate) fn has_file(&self) -> bool {
        self.file.is_some()
    }

    pub(crate) fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// Writes the state file if anything changed since the last write:
    /// to a temporary file first, then renamed over the old one, so a crash
    /// leaves the old or the new file, never half of one.
    pub(crate) fn persist(&self) -> std::io::Result<()> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        self.write(path).inspect_err(|_| self.mark_dirty())
    }

    fn write(&self, path: &Path) -> std::io::Result<()> {
        let now = self.clock.now();
        let spend = self
            .lock()
            .iter()
            .map(|(tenant, s)| {
                let periods = s
                    .lock()
                    .spent
                    .iter()
                    .filter(|(k, _)| is_current(k, now))
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                (tenant.clone(), periods)
            })
            .collect();
        let bytes =
            serde_json::to_vec(&StateFile { version: 1, spend }).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI64;

    /// A clock tests set by hand.
    pub(crate) struct FakeClock(pub AtomicI64);
    impl Clock for FakeClock {
        fn now(&self) -> i64 {
            self.0.load(Ordering::Acquire)
        }
    }

    fn at(y: i64, m: u32, d: u32, h: i64) -> i64 {
        days_from_civil(y, m, d) * DAY + h * 3600
    }

    #[test]
    fn civil_round_trips() {
        for days in [-800_000, -1, 0, 1, 11_016, 20_787, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn periods_end_at_midnight_monday_and_the_first() {
        let t = at(2026, 11, 30, 15); // a Monday
        let d = span(BudgetPeriod::Day, t);
        assert_eq!(d.key, "day:2026-11-30");
        assert_eq!(d.end, at(2026, 12, 1, 0));
        let w = span(BudgetPeriod::Week, at(2026, 12, 6, 23)); // the Sunday after
        assert_eq!(w.key, "week:2026-11-30");
        assert_eq!(w.end, at(2026, 12, 7, 0));
        assert_eq!(span(BudgetPeriod::Week, t).key, "week:2026-11-30");
        let m = span(BudgetPeriod::Month, t);
        assert_eq!(m.key, "month:2026-11");
        assert_eq!(m.end, at(2026, 12, 1, 0));
        let dec = span(BudgetPeriod::Month, at(2026, 12, 31, 23));
        assert_eq!(dec.key, "month:2026-12");
        assert_eq!(dec.end, at(2027, 1, 1, 0));
        // The last second of a period, and the first of the next.
        assert_eq!(span(BudgetPeriod::Day, d.end - 1).key, d.key);
        assert_ne!(span(BudgetPeriod::Day, d.end).key, d.key);
        assert_eq!(
            span(BudgetPeriod::Month, at(2028, 2, 29, 12)).end,
            at(2028, 3, 1, 0)
        );
    }

    #[test]
    fn state_file_survives_and_forgets_old_periods() {
        let dir = std::env::temp_dir().join(format!("sluice-budget-{:x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("spend.json");
        let clock = Arc::new(FakeClock(AtomicI64::new(at(2026, 11, 30, 12))));
        let b = Budgets::open(Some(&path), clock.clone()).expect("missing file starts empty");
        assert!(path.exists(), "and is created");
        let month = span(BudgetPeriod::Month, clock.now()).key;
        b.spend("a").add(&month, 1.5);
        b.mark_dirty();
        b.persist().expect("write");
        let again = Budgets::open(Some(&path), clock.clone()).expect("read");
        assert_eq!(again.spend("a").spent(&month), 1.5);
        // Next month, the old spend is ignored.
        clock.0.store(at(2026, 12, 1, 0), Ordering::Release);
        let later = Budgets::open(Some(&path), clock.clone()).expect("read");
        let december = span(BudgetPeriod::Month, clock.now()).key;
        assert_eq!(later.spend("a").spent(&december), 0.0);
        assert_eq!(later.spend("a").spent(&month), 0.0);
        // A corrupt file is an error naming it.
        std::fs::write(&path, b"{not json").expect("write");
        let err = Budgets::open(Some(&path), clock).err().expect("corrupt");
        assert!(err.contains(&path.display().to_string()), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
