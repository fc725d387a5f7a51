//! `counter`: an INTEGER column whose concurrent changes add up.
//!
//! A device captures a write as the difference between the value it wrote
//! and the value it saw (`SET n = n + 1` and `SET n = 7` over 6 both send
//! +1); the server adds the delta to the stored value, refusing one that
//! would leave the column's bounds (`BOUND`) or the 64-bit range
//! (`OVERFLOW`); the log carries the new total. NULL counts as 0.

use super::{refusal, Refusal};
use crate::schema::Column;
use crate::value::Value;

fn integer(column: &str, v: &Value) -> Result<i64, String> {
    match v {
        Value::Null => Ok(0),
        Value::Integer(i) => Ok(*i),
        // SQLite turns integer arithmetic that overflows into a real.
        Value::Real(r) if r.abs() >= 9.223_372_036_854_775e18 => Err(format!(
            "counter column '{column}' would go past what a 64-bit integer holds"
        )),
        other => Err(format!(
            "counter column '{column}' holds whole numbers, not {}",
            other.type_name()
        )),
    }
}

/// The delta a device's write makes (None: no change). Errors: the new value
/// is not an integer (or NULL), or the difference overflows 64 bits.
pub fn capture(column: &str, old: &Value, new: &Value) -> Result<Option<i64>, String> {
    let new = integer(column, new)?;
    let old = integer(column, old).unwrap_or(0);
    let delta = new.checked_sub(old).ok_or_else(|| {
        format!("counter column '{column}' changes by more than a 64-bit integer holds")
    })?;
    Ok((delta != 0).then_some(delta))
}

/// Checks the value a new row starts with.
pub fn check_initial(column: &Column, v: &Value) -> Result<(), Refusal> {
    let n = integer(&column.name, v).map_err(|why| refusal("INVALID", why))?;
    let outside = match (column.min, column.max) {
        (Some(min), _) if n < min => Some(format!("below its minimum {min}")),
        (_, Some(max)) if n > max => Some(format!("above its maximum {max}")),
        _ => None,
    };
    match outside {
        Some(why) => Err(refusal(
            "BOUND",
            format!(
                "a new row's counter '{}' would start at {n}, {why}",
                column.name
            ),
        )),
        None => Ok(()),
    }
}

fn check_bounds(column: &Column, current: i64, new: i64) -> Result<(), Refusal> {
    if let Some(min) = column.min.filter(|min| new < *min) {
        return Err(refusal(
            "BOUND",
            format!(
                "counter '{}' would go to {new}, below its minimum {min} (current value {current})",
                column.name
            ),
        ));
    }
    if let Some(max) = column.max.filter(|max| new > *max) {
        return Err(refusal(
            "BOUND",
            format!(
                "counter '{}' would go to {new}, above its maximum {max} (current value {current})",
                column.name
            ),
        ));
    }
    Ok(())
}

/// The server's merge: the stored value plus `delta`, within bounds.
pub fn merge(column: &Column, current: &Value, delta: i64) -> Result<i64, Refusal> {
    let current = integer(&column.name, current).unwrap_or(0);
    let new = current.checked_add(delta).ok_or_else(|| {
        refusal(
            "OVERFLOW",
            format!(
                "counter '{}' would overflow a 64-bit integer ({current} + {delta})",
                column.name
            ),
        )
    })?;
    check_bounds(column, current, new)?;
    Ok(new)
}

/// A device replaying a pending delta over its current view.
pub fn apply(column: &str, current: &Value, delta: i64) -> Result<Value, String> {
    let current = integer(column, current).unwrap_or(0);
    current
        .checked_add(delta)
        .map(Value::Integer)
        .ok_or_else(|| format!("counter column '{column}' overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::MergePolicy;

    fn col(min: Option<i64>, max: Option<i64>) -> Column {
        Column {
            name: "stock".into(),
            declared_type: "INTEGER".into(),
            policy: MergePolicy::Counter,
            min,
            max,
        }
    }

    use proptest::prelude::*;

    proptest! {
        /// Unbounded deltas from any number of devices add up to the same
        /// total in every delivery order.
        #[test]
        fn deltas_sum_in_every_delivery_order(
            deltas in proptest::collection::vec(-1_000_000i64..1_000_000, 0..20),
            rotate in any::<usize>(),
        ) {
            let c = col(None, None);
            let apply = |ds: &[i64]| ds.iter().try_fold(Value::Integer(0), |v, d| merge(&c, &v, *d).map(Value::Integer));
            let mut other = deltas.clone();
            other.reverse();
            let k = if other.is_empty() { 0 } else { rotate % other.len() };
            other.rotate_left(k);
            let want = Value::Integer(deltas.iter().sum());
            prop_assert_eq!(apply(&deltas).unwrap(), want.clone());
            prop_assert_eq!(apply(&other).unwrap(), want);
        }
    }

    #[test]
    fn a_write_is_the_difference_from_what_the_device_saw() {
        assert_eq!(
            capture("n", &Value::Integer(6), &Value::Integer(7)),
            Ok(Some(1))
        );
        assert_eq!(
            capture("n", &Value::Integer(6), &Value::Integer(6)),
            Ok(None)
        );
        assert_eq!(
            capture("n", &Value::Null, &Value::Integer(-3)),
            Ok(Some(-3))
        );
        assert!(capture("n", &Value::Integer(0), &Value::Text("x".into())).is_err());
        assert!(capture("n", &Value::Integer(-1), &Value::Integer(i64::MAX)).is_err());
    }

    #[test]
    fn bounds_and_overflow_are_refused_with_the_current_value() {
        let c = col(Some(0), Some(10));
        assert_eq!(merge(&c, &Value::Integer(3), -3), Ok(0));
        let e = merge(&c, &Value::Integer(0), -1).unwrap_err();
        assert_eq!(e.code, "BOUND");
        assert!(
            e.reason.contains("minimum 0") && e.reason.contains("current value 0"),
            "{}",
            e.reason
        );
        assert_eq!(merge(&c, &Value::Integer(9), 2).unwrap_err().code, "BOUND");
        let e = merge(&col(None, None), &Value::Integer(i64::MAX), 1).unwrap_err();
        assert_eq!(e.code, "OVERFLOW");
        assert_eq!(
            check_initial(&c, &Value::Integer(11)).unwrap_err().code,
            "BOUND"
        );
        assert_eq!(
            check_initial(&c, &Value::Real(1.0)).unwrap_err().code,
            "INVALID"
        );
    }
}
