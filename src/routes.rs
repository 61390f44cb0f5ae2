//! Declarative broadcast routes: `POST /{module}/broadcast/{kind}` → topics.
//!
//! A route is data from `[[routes]]` in `config.toml`, not code, so another
//! module's rules are added without a rebuild. A route lists topic templates
//! whose `{placeholders}` are filled from payload fields of a declared format,
//! and extra topics added when a payload field is the JSON `true`.
//!
//! ```toml
//! [[routes]]
//! module = "projects"
//! kind = "project"
//! topics = ["projects:all", "projects:project:{uuid}"]
//! fields = { uuid = "uuid" }
//! when_true = [{ field = "is_template", topics = ["projects:templates"] }]
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::model::{Topic, MAX_TOPICS};

/// How a payload field is turned into part of a topic name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldFormat {
    /// A UUID in any common spelling, written lowercase and hyphenated.
    Uuid,
    /// A string of topic characters, written as is.
    TopicPart,
}

/// Extra topics added when a payload field is exactly JSON `true`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conditional {
    /// Dotted path of the payload field.
    pub field: String,
    /// Topic templates added when it is `true`.
    pub topics: Vec<String>,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// First path segment: `/{module}/broadcast/{kind}`.
    #[serde(default = "default_module")]
    pub module: String,
    /// Broadcast kind: the last path segment.
    pub kind: String,
    /// Topic templates, in the order the topics are listed in the answer.
    pub topics: Vec<String>,
    /// Placeholder name (a dotted payload path) → required format.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldFormat>,
    /// Conditional extra topics.
    #[serde(default)]
    pub when_true: Vec<Conditional>,
}

fn default_module() -> String {
    "projects".into()
}

/// Why a payload could not be routed. Mapped to `422 invalid_payload`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("payload must be a JSON object")]
    NotAnObject,
    #[error("payload field `{0}` is missing")]
    Missing(String),
    #[error("payload field `{field}` must be {expected}")]
    Invalid {
        field: String,
        expected: &'static str,
    },
    #[error("the topic built from the payload is invalid: {0}")]
    Topic(String),
}

/// The PhoenixKitProjects.PubSub rules, as shipped in `config.toml`.
pub fn projects_routes() -> Vec<RouteSpec> {
    let route =
        |kind: &str, topics: &[&str], field: Option<&str>, when: Option<(&str, &str)>| RouteSpec {
            module: "projects".into(),
            kind: kind.into(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            fields: field
                .map(|f| (f.to_owned(), FieldFormat::Uuid))
                .into_iter()
                .collect(),
            when_true: when
                .map(|(field, topic)| Conditional {
                    field: field.into(),
                    topics: vec![topic.into()],
                })
                .into_iter()
                .collect(),
        };
    vec![
        route(
            "project",
            &["projects:all", "projects:project:{uuid}"],
            Some("uuid"),
            Some(("is_template", "projects:templates")),
        ),
        route("task", &["projects:all", "projects:tasks"], None, None),
        route(
            "assignment",
            &["projects:all", "projects:project:{project_uuid}"],
            Some("project_uuid"),
            None,
        ),
        route(
            "dependency",
            &["projects:all", "projects:project:{project_uuid}"],
            Some("project_uuid"),
            None,
        ),
    ]
}

impl RouteSpec {
    /// Checks the route is well formed: path segments, placeholders declared,
    /// literal parts made of topic characters.
    pub fn validate(&self) -> Result<(), String> {
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
        };
        if !segment_ok(&self.module) || !segment_ok(&self.kind) {
            return Err("module and kind must be [A-Za-z0-9_-]+".into());
        }
        if self.topics.is_empty() {
            return Err("topics must not be empty".into());
        }
        let all = self
            .topics
            .iter()
            .chain(self.when_true.iter().flat_map(|c| c.topics.iter()));
        let mut count = 0;
        for template in all {
            count += 1;
            for part in split_template(template)? {
                match part {
                    Part::Literal(text) if !crate::model::literal_topic_ok(text) => {
                        return Err(format!(
                            "topic template {template:?} has characters not allowed in a topic"
                        ));
                    }
                    Part::Field(name) if !self.fields.contains_key(name) => {
                        return Err(format!(
                            "placeholder {{{name}}} in {template:?} is not declared in `fields`"
                        ));
                    }
                    _ => {}
                }
            }
        }
        if count > MAX_TOPICS {
            return Err(format!("a route may produce at most {MAX_TOPICS} topics"));
        }
        Ok(())
    }

    /// The topics an event with this payload goes to, in template order,
    /// repeats removed.
    pub fn topics_for(&self, payload: &Value) -> Result<Vec<Topic>, RouteError> {
        if !payload.is_object() {
            return Err(RouteError::NotAnObject);
        }
        let mut values = BTreeMap::new();
        for (field, format) in &self.fields {
            let value = lookup(payload, field).ok_or_else(|| RouteError::Missing(field.clone()))?;
            values.insert(field.as_str(), render_field(field, value, *format)?);
        }
        let conditional = self
            .when_true
            .iter()
            .filter(|c| lookup(payload, &c.field) == Some(&Value::Bool(true)))
            .flat_map(|c| c.topics.iter());
        let mut topics: Vec<Topic> = Vec::new();
        for template in self.topics.iter().chain(conditional) {
            let mut name = String::new();
            // Templates were checked by `validate`; a bad one here is a payload problem.
            for part in split_template(template).map_err(RouteError::Topic)? {
                match part {
                    Part::Literal(text) => name.push_str(text),
                    Part::Field(field) => name.push_str(
                        values
                            .get(field)
                            .ok_or_else(|| RouteError::Missing(field.to_owned()))?,
                    ),
                }
            }
            let topic = Topic::parse(&name).map_err(|e| RouteError::Topic(e.to_string()))?;
            if !topics.contains(&topic) {
                topics.push(topic);
            }
        }
        Ok(topics)
    }
}

/// Follows a dotted path (`project.uuid`) into a JSON object.
fn lookup<'a>(payload: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(payload, |value, key| value.as_object()?.get(key))
}

fn render_field(field: &str, value: &Value, format: FieldFormat) -> Result<String, RouteError> {
    match format {
        FieldFormat::Uuid => value
            .as_str()
            .and_then(|s| uuid::Uuid::parse_str(s).ok())
            .map(|u| u.hyphenated().to_string())
            .ok_or_else(|| RouteError::Invalid {
                field: field.into(),
                expected: "a UUID string",
            }),
        FieldFormat::TopicPart => value
            .as_str()
            .filter(|s| !s.is_empty() && Topic::parse(s).is_ok())
            .map(str::to_owned)
            .ok_or_else(|| RouteError::Invalid {
                field: field.into(),
                expected: "a string of topic characters [A-Za-z0-9._~:@-]",
            }),
    }
}

enum Part<'a> {
    Literal(&'a str),
    Field(&'a str),
}

fn split_template(template: &str) -> Result<Vec<Part<'_>>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        parts.push(Part::Literal(&rest[..open]));
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in topic template {template:?}"))?;
        let name = &after[..close];
        if name.is_empty() {
            return Err(format!("empty placeholder in topic template {template:?}"));
        }
        parts.push(Part::Field(name));
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("stray '}}' in topic template {template:?}"));
    }
    parts.push(Part::Literal(rest));
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn route(kind: &str) -> RouteSpec {
        projects_routes()
            .into_iter()
            .find(|r| r.kind == kind)
            .unwrap()
    }

    fn names(topics: Vec<Topic>) -> Vec<String> {
        topics.into_iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn project_routes_follow_the_module() {
        let id = "3F1C2B4A-1111-4222-8333-444455556666";
        let lower = id.to_lowercase();
        let got = route("project")
            .topics_for(&json!({"uuid": id, "is_template": true}))
            .unwrap();
        assert_eq!(
            names(got),
            [
                "projects:all",
                &format!("projects:project:{lower}"),
                "projects:templates"
            ]
        );
        let got = route("project")
            .topics_for(&json!({"uuid": id, "is_template": "true"}))
            .unwrap();
        assert_eq!(names(got).len(), 2, "is_template counts only as JSON true");
        let got = route("task").topics_for(&json!({})).unwrap();
        assert_eq!(names(got), ["projects:all", "projects:tasks"]);
        for kind in ["assignment", "dependency"] {
            let got = route(kind)
                .topics_for(&json!({"project_uuid": id}))
                .unwrap();
            assert_eq!(
                names(got),
                ["projects:all", &format!("projects:project:{lower}")]
            );
        }
    }

    #[test]
    fn bad_routing_fields_are_refused() {
        assert_eq!(
            route("project").topics_for(&json!({})),
            Err(RouteError::Missing("uuid".into()))
        );
        assert!(matches!(
            route("project").topics_for(&json!({"uuid": "nope"})),
            Err(RouteError::Invalid { .. })
        ));
        assert!(matches!(
            route("project").topics_for(&json!({"uuid": 5})),
            Err(RouteError::Invalid { .. })
        ));
        assert_eq!(
            route("task").topics_for(&json!([1])),
            Err(RouteError::NotAnObject)
        );
    }

    #[test]
    fn validation_catches_undeclared_placeholders() {
        let mut spec = route("task");
        spec.topics.push("x:{nope}".into());
        assert!(spec.validate().unwrap_err().contains("nope"));
        for spec in projects_routes() {
            spec.validate().unwrap();
        }
    }
}
