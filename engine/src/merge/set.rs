//! `set`: a TEXT column holding a JSON array of scalars, merged as an
//! observed-remove, add-wins set.
//!
//! A device captures a write of the array as element adds and removes
//! against the array it saw. The server keeps, per element, the adds not yet
//! seen by a later writer of that element (a [`Dot`] each): a remove takes
//! away only the adds its writer had seen, so a concurrent add of the same
//! element survives (add wins). The value every device shows is the
//! canonical array: elements deduplicated and sorted null, false, true, then
//! numbers by value, then strings by code point, written as compact JSON.
//! `1` and `1.0` are different elements (their JSON differs).

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use super::{refusal, Dot, Refusal, Writer};
use crate::value::Value;

/// The most elements one set cell holds.
pub const ELEMENTS_MAX: usize = 1000;
/// The longest element, in bytes of its JSON text.
pub const ELEMENT_BYTES_MAX: usize = 1024;

/// One element: the canonical JSON text of a scalar.
pub type Element = String;

fn rank(v: &serde_json::Value) -> u8 {
    match v {
        serde_json::Value::Null => 0,
        serde_json::Value::Bool(false) => 1,
        serde_json::Value::Bool(true) => 2,
        serde_json::Value::Number(_) => 3,
        _ => 4,
    }
}

/// The canonical order of two elements (JSON texts of scalars).
pub fn order(a: &str, b: &str) -> Ordering {
    let (Ok(x), Ok(y)) = (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) else {
        return a.cmp(b);
    };
    rank(&x).cmp(&rank(&y)).then_with(|| match (&x, &y) {
        (serde_json::Value::Number(m), serde_json::Value::Number(n)) => m
            .as_f64()
            .unwrap_or(0.0)
            .total_cmp(&n.as_f64().unwrap_or(0.0))
            .then_with(|| a.cmp(b)),
        (serde_json::Value::String(s), serde_json::Value::String(t)) => s.cmp(t),
        _ => Ordering::Equal,
    })
}

fn sort(elements: &mut Vec<Element>) {
    elements.sort_by(|a, b| order(a, b));
    elements.dedup();
}

/// Reads a cell as a set. Errors name the column and what is wrong: not
/// TEXT, not JSON, not an array, an element that is not a scalar, too many
/// or too long elements.
pub fn parse(column: &str, v: &Value) -> Result<Vec<Element>, String> {
    let Value::Text(text) = v else {
        return Err(format!(
            "set column '{column}' holds a JSON array as TEXT, not {} (write '[]' for an empty set)",
            v.type_name()
        ));
    };
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("set column '{column}' holds a JSON array: {e}"))?;
    let serde_json::Value::Array(items) = json else {
        return Err(format!(
            "set column '{column}' holds a JSON array, not {text}"
        ));
    };
    let mut elements = Vec::with_capacity(items.len());
    for item in items {
        if item.is_array() || item.is_object() {
            return Err(format!(
                "set column '{column}' holds scalars (strings, numbers, true, false, null), not {item}"
            ));
        }
        let e = item.to_string();
        if e.len() > ELEMENT_BYTES_MAX {
            return Err(format!(
                "set column '{column}': an element is {} bytes long, more than the {ELEMENT_BYTES_MAX} a set element may be",
                e.len()
            ));
        }
        elements.push(e);
    }
    sort(&mut elements);
    if elements.len() > ELEMENTS_MAX {
        return Err(format!(
            "set column '{column}' would hold {} elements, more than the {ELEMENTS_MAX} a set may hold",
            elements.len()
        ));
    }
    Ok(elements)
}

/// The canonical JSON text of a set.
pub fn to_text(elements: &[Element]) -> String {
    format!("[{}]", elements.join(","))
}

/// What a device's write of a set cell did: (added, removed, the canonical
/// value). An old value that is not a set (written outside Hearth) counts
/// as empty.
pub fn capture(
    column: &str,
    old: &Value,
    new: &Value,
) -> Result<(Vec<Element>, Vec<Element>, Value), String> {
    let new = parse(column, new)?;
    let old = parse(column, old).unwrap_or_default();
    let added = new
        .iter()
        .filter(|e| old.binary_search_by(|o| order(o, e)).is_err())
        .cloned()
        .collect();
    let removed = old
        .iter()
        .filter(|e| new.binary_search_by(|n| order(n, e)).is_err())
        .cloned()
        .collect();
    Ok((added, removed, Value::Text(to_text(&new))))
}

/// A device replaying pending adds and removes over its current view.
pub fn apply(column: &str, current: &Value, add: &[Element], remove: &[Element]) -> Value {
    let mut elements = parse(column, current).unwrap_or_default();
    elements.retain(|e| !remove.contains(e));
    elements.extend(add.iter().cloned());
    sort(&mut elements);
    Value::Text(to_text(&elements))
}

/// The server's state of one set cell: each present element with the adds
/// of it that no later writer of it had seen (concurrent adds).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SetState {
    elements: Vec<(Element, Vec<Dot>)>,
}

impl SetState {
    /// A cell first written whole (an inserted row, or a value the server
    /// holds without state, say from before the policy applied): every
    /// element added by `dot`.
    pub fn from_value(column: &str, v: &Value, dot: Dot) -> Result<SetState, String> {
        Ok(SetState {
            elements: parse(column, v)?
                .into_iter()
                .map(|e| (e, vec![dot]))
                .collect(),
        })
    }

    /// The canonical value.
    pub fn value(&self) -> Value {
        let elements: Vec<Element> = self.elements.iter().map(|(e, _)| e.clone()).collect();
        Value::Text(to_text(&elements))
    }

    /// Merges one writer's adds and removes. A remove takes away the adds of
    /// the element the writer had seen; an add replaces the adds it had seen
    /// with its own (they are covered by it), keeping concurrent ones.
    pub fn merge(
        &mut self,
        column: &str,
        add: &[Element],
        remove: &[Element],
        w: &Writer<'_>,
    ) -> Result<(), Refusal> {
        for e in add.iter().chain(remove) {
            let ok = serde_json::from_str::<serde_json::Value>(e)
                .map(|v| {
                    let canonical = v.to_string();
                    !v.is_array() && !v.is_object() && canonical == *e
                })
                .unwrap_or(false);
            if !ok || e.len() > ELEMENT_BYTES_MAX {
                return Err(refusal(
                    "INVALID",
                    format!("set column '{column}': {e:?} is not the canonical JSON of a scalar of at most {ELEMENT_BYTES_MAX} bytes"),
                ));
            }
        }
        for e in remove {
            if let Ok(i) = self.find(e) {
                self.elements[i].1.retain(|d| !d.seen_by(w));
                if self.elements[i].1.is_empty() {
                    self.elements.remove(i);
                }
            }
        }
        for e in add {
            match self.find(e) {
                Ok(i) => {
                    let dots = &mut self.elements[i].1;
                    dots.retain(|d| !d.seen_by(w));
                    dots.push(Dot::of(w));
                }
                Err(i) => self.elements.insert(i, (e.clone(), vec![Dot::of(w)])),
            }
        }
        if self.elements.len() > ELEMENTS_MAX {
            return Err(refusal(
                "BOUND",
                format!(
                    "set column '{column}' would hold {} elements, more than the {ELEMENTS_MAX} a set may hold",
                    self.elements.len()
                ),
            ));
        }
        Ok(())
    }

    fn find(&self, e: &str) -> Result<usize, usize> {
        self.elements.binary_search_by(|(x, _)| order(x, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn w(client_id: u64, client_seq: u64, base: u64, server_seq: u64) -> Writer<'static> {
        Writer {
            client_id,
            client_seq,
            base,
            server_seq,
            also_seen: &[],
        }
    }

    #[test]
    fn canonical_order_and_bad_values() {
        let (_, _, v) = capture(
            "tags",
            &text("[]"),
            &text(r#"["b", 2, "a", null, true, 10, false, "a", 1.5]"#),
        )
        .unwrap();
        assert_eq!(v, text(r#"[null,false,true,1.5,2,10,"a","b"]"#));
        for bad in [r#"{"a":1}"#, "[[1]]", r#"[{"x":1}]"#, "not json", "3"] {
            assert!(parse("tags", &text(bad)).is_err(), "{bad}");
        }
        assert!(parse("tags", &Value::Integer(1))
            .unwrap_err()
            .contains("not integer"));
        let many = format!(
            "[{}]",
            (0..=ELEMENTS_MAX)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(parse("tags", &text(&many))
            .unwrap_err()
            .contains("more than"));
    }

    #[test]
    fn a_write_is_adds_and_removes_against_what_was_seen() {
        let (add, remove, _) =
            capture("tags", &text(r#"["a","b"]"#), &text(r#"["b","c"]"#)).unwrap();
        assert_eq!(
            (add, remove),
            (vec![r#""c""#.to_string()], vec![r#""a""#.to_string()])
        );
    }

    use proptest::prelude::*;

    /// Each writer's operations in its own order: (add?, element 0..4).
    fn writers() -> impl Strategy<Value = Vec<Vec<(bool, u8)>>> {
        proptest::collection::vec(
            proptest::collection::vec((any::<bool>(), 0u8..4), 1..6),
            2..4,
        )
    }

    proptest! {
        /// Writers that saw none of each other's writes (base 0), each
        /// applying its own operations in order: the set the server ends
        /// with does not depend on how their operations interleave, and an
        /// element is present exactly when some writer's last operation on
        /// it was an add (add wins over a concurrent remove).
        #[test]
        fn concurrent_writers_end_the_same_in_every_delivery_order(
            ops in writers(),
            order_seed in any::<u64>(),
        ) {
            let run = |interleave: &[usize]| {
                let mut state = SetState::default();
                let mut next = vec![0usize; ops.len()];
                for (server_seq, &writer) in interleave.iter().enumerate() {
                    let (add, e) = ops[writer][next[writer]];
                    next[writer] += 1;
                    let elem = vec![format!("\"e{e}\"")];
                    let w = Writer {
                        client_id: writer as u64 + 1,
                        client_seq: next[writer] as u64,
                        base: 0,
                        server_seq: server_seq as u64 + 1,
                        also_seen: &[],
                    };
                    let (a, r): (&[String], &[String]) = if add { (&elem, &[]) } else { (&[], &elem) };
                    state.merge("t", a, r, &w).unwrap();
                }
                state.value()
            };
            // One interleaving writer by writer, and one shuffled by the seed.
            let in_turn: Vec<usize> = ops.iter().enumerate().flat_map(|(i, o)| std::iter::repeat_n(i, o.len())).collect();
            let mut shuffled = in_turn.clone();
            let mut x = order_seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let a = run(&in_turn);
            prop_assert_eq!(&a, &run(&shuffled));
            let mut want: Vec<String> = (0u8..4)
                .filter(|e| ops.iter().any(|o| o.iter().rev().find(|(_, x)| x == e).is_some_and(|(add, _)| *add)))
                .map(|e| format!("\"e{e}\""))
                .collect();
            want.sort();
            prop_assert_eq!(a, Value::Text(to_text(&want)));
        }
    }

    #[test]
    fn a_concurrent_add_survives_a_remove_and_a_seen_one_does_not() {
        let x = vec![r#""x""#.to_string()];
        let mut s = SetState::default();
        s.merge("t", &x, &[], &w(1, 1, 0, 1)).unwrap();
        // Device 2 had not seen the add (base 0) and adds x too: concurrent.
        s.merge("t", &x, &[], &w(2, 1, 0, 2)).unwrap();
        // Device 1 removes x having seen only its own add: device 2's stays.
        s.merge("t", &[], &x, &w(1, 2, 0, 3)).unwrap();
        assert_eq!(s.value(), text(r#"["x"]"#));
        // Device 3 saw everything up to 3 and removes it: gone.
        s.merge("t", &[], &x, &w(3, 1, 3, 4)).unwrap();
        assert_eq!(s.value(), text("[]"));
    }
}
