//! A CNI network config file edited without disturbing it: the top-level
//! keys keep their order and every value other than `plugins` (and every
//! plugin entry) is carried through as the exact text it was.

use std::fmt;

use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{MapAccess, Visitor},
    ser::SerializeMap,
};
use serde_json::{Value, value::RawValue};

#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("not a JSON object: {0}")]
    Json(#[from] serde_json::Error),
    #[error("its `plugins` is not a list")]
    PluginsNotAList,
}

/// A JSON object whose members stay in file order, values untouched.
#[derive(Debug, Clone)]
pub struct Ordered(pub Vec<(String, Box<RawValue>)>);

impl Ordered {
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfError> {
        Ok(serde_json::from_slice(bytes)?)
    }

    fn get(&self, key: &str) -> Option<&RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| &**v)
    }

    /// A `.conflist` (a `plugins` list) rather than a single-plugin `.conf`.
    pub fn is_list(&self) -> bool {
        self.get("plugins").is_some()
    }

    pub fn plugins(&self) -> Result<Vec<Box<RawValue>>, ConfError> {
        match self.get("plugins") {
            None => Ok(Vec::new()),
            Some(raw) => serde_json::from_str(raw.get()).map_err(|_| ConfError::PluginsNotAList),
        }
    }

    pub fn set_plugins(&mut self, plugins: &[Box<RawValue>]) -> Result<(), ConfError> {
        // One entry per line; each entry keeps its own text.
        let raw = RawValue::from_string(serde_json::to_string_pretty(plugins)?)?;
        match self.0.iter_mut().find(|(k, _)| k == "plugins") {
            Some((_, v)) => *v = raw,
            None => self.0.push(("plugins".into(), raw)),
        }
        Ok(())
    }

    /// The value of a string member, when it is one.
    pub fn string(&self, key: &str) -> Option<String> {
        self.get(key)
            .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
    }

    /// The whole object as a plain value, for comparing meaning.
    pub fn to_value(&self) -> Result<Value, ConfError> {
        Ok(serde_json::from_str(&serde_json::to_string(self)?)?)
    }

    pub fn to_pretty(&self) -> Result<Vec<u8>, ConfError> {
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        Ok(bytes)
    }
}

/// The `type` of a plugin entry.
pub fn plugin_type(plugin: &RawValue) -> Option<String> {
    #[derive(Deserialize)]
    struct Typed {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    serde_json::from_str::<Typed>(plugin.get()).ok()?.kind
}

impl Serialize for Ordered {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OrderedVisitor;
        impl<'de> Visitor<'de> for OrderedVisitor {
            type Value = Ordered;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Ordered, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = access.next_entry::<String, Box<RawValue>>()? {
                    members.push(member);
                }
                Ok(Ordered(members))
            }
        }
        deserializer.deserialize_map(OrderedVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_their_order_and_text() {
        let conf = Ordered::parse(br#"{"z": 1, "name":"n", "a": {"k" : [1,  2]}}"#).unwrap();
        let keys: Vec<&str> = conf.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["z", "name", "a"]);
        assert_eq!(conf.0[2].1.get(), r#"{"k" : [1,  2]}"#);
        assert_eq!(conf.string("name").as_deref(), Some("n"));
        assert!(!conf.is_list());
    }
}
