//! Checking a JSON body's shape without building it: a body is read once, as a stream of tokens,
//! keeping only what the door needs (object or array, how many elements, which one is not an
//! object). A `serde_json::Value` of a 1 MiB `[0,0,…]` takes 16–24 MiB; this takes a few words,
//! so the memory of requests in flight is bounded by their bytes.

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The top level of a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    Object,
    Array {
        len: usize,
        /// The first element that is not an object.
        first_non_object: Option<usize>,
    },
    /// A string, number, boolean or null.
    Scalar,
}

/// The shape of `body`; `Err` when it is not JSON at all.
pub fn shape(body: &[u8]) -> Result<Shape, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let s = ShapeOf { top: true }.deserialize(&mut de)?;
    de.end()?;
    Ok(s)
}

/// Reads one value's shape, skipping its content; only the top level's array elements are
/// looked at (each one's own shape), nested arrays are skipped whole.
struct ShapeOf {
    top: bool,
}

impl<'de> DeserializeSeed<'de> for ShapeOf {
    type Value = Shape;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Shape, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ShapeOf {
    type Value = Shape;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Shape, A::Error> {
        while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Shape::Object)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Shape, A::Error> {
        let (mut len, mut first_non_object) = (0, None);
        if !self.top {
            while s.next_element::<IgnoredAny>()?.is_some() {}
        } else {
            while let Some(element) = s.next_element_seed(ShapeOf { top: false })? {
                if element != Shape::Object && first_non_object.is_none() {
                    first_non_object = Some(len);
                }
                len += 1;
            }
        }
        Ok(Shape::Array {
            len,
            first_non_object,
        })
    }

    fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::Scalar)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::Scalar)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::Scalar)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Scalar)
    }
    fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::Scalar)
    }
    fn visit_unit<E>(self) -> Result<Shape, E> {
        Ok(Shape::Scalar)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_read_without_building_the_value() {
        assert_eq!(shape(br#"{"a":[1,2,{"b":null}]}"#).unwrap(), Shape::Object);
        assert_eq!(
            shape(br#"[{"a":1},{"b":2}]"#).unwrap(),
            Shape::Array {
                len: 2,
                first_non_object: None
            }
        );
        assert_eq!(
            shape(br#"[{"a":1},3,{}]"#).unwrap(),
            Shape::Array {
                len: 3,
                first_non_object: Some(1)
            }
        );
        assert_eq!(
            shape(b"[]").unwrap(),
            Shape::Array {
                len: 0,
                first_non_object: None
            }
        );
        assert_eq!(shape(b"\"x\"").unwrap(), Shape::Scalar);
        assert!(shape(b"{\"a\":").is_err());
        assert!(shape(b"{} {}").is_err());
        // Well-formed JSON a Value cannot hold is still JSON here.
        assert_eq!(
            shape(br#"{"a":"\ud800","n":1e400}"#).unwrap(),
            Shape::Object
        );
        let big = format!("[{}0]", "0,".repeat(500_000));
        assert_eq!(
            shape(big.as_bytes()).unwrap(),
            Shape::Array {
                len: 500_001,
                first_non_object: Some(0)
            }
        );
    }
}
