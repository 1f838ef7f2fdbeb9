//! Policy evaluation with Cedar (DESIGN §3).
//!
//! Policies are Cedar `permit`/`forbid` statements; break-glass obligations are
//! annotations on permits. Loading parses, validates against the breakglass
//! schema and checks every annotation, naming the line of the first mistake.
//! Evaluation is fail-closed: any evaluation error denies, unlike Cedar's
//! default of skipping the erroring policy.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, PolicyId, PolicySet, RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;
use regex::Regex;
use thiserror::Error;

use crate::model::{APPROVALS_MAX, Authn, Principal, PrincipalKind};
use crate::time::{Timestamp, format_duration, parse_duration};

/// Policy files larger than this are refused: a policy set is hand-written.
pub const POLICY_FILE_LEN_MAX: usize = 1024 * 1024;
/// Ticket patterns are compiled with this size limit, so a policy cannot make
/// every request pay for a huge automaton.
const TICKET_REGEX_SIZE_MAX: usize = 64 * 1024;

/// The schema every policy is validated against. Typos in entity types,
/// actions or context attributes are caught at load, not at 2 a.m.
pub const SCHEMA: &str = r#"
entity Group;
entity User in [Group] {
  // "human", "workload" or "local".
  kind: String,
} tags String;
entity TargetGroup;
entity Target in [TargetGroup];
action request, emergency appliesTo {
  principal: [User],
  resource: [Target],
  context: {
    role: String,
    duration_s: Long,
    reason: String,
    ticket: String,
    hour_utc: Long,
    weekday: Long,
    auth_method: String,
    auth_age_s: Long,
    mfa: Bool,
  }
};
"#;

const KNOWN_ANNOTATIONS: [&str; 9] = [
    "id",
    "approvals",
    "approvers",
    "max_duration",
    "require_ticket",
    "countersign_within",
    "approver_fresh_auth",
    "require_mfa",
    "review",
];

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    #[error("{file}:{line}:{column}: {reason}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        reason: String,
    },
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
}

/// `normal` requests go through approvals; `emergency` ones self-activate
/// when the policy allows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Request,
    Emergency,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Request => "request",
            Action::Emergency => "emergency",
        }
    }
}

/// Everything a decision depends on; the caller resolves groups.
#[derive(Debug, Clone)]
pub struct PolicyInput<'a> {
    pub principal: &'a str,
    pub principal_groups: &'a [String],
    /// `principal.kind` in Cedar.
    pub kind: PrincipalKind,
    /// How the principal authenticated: `context.auth_method`,
    /// `context.auth_age_s`, `context.mfa`, and a workload's matched claims
    /// as the principal's tags.
    pub authn: &'a Authn,
    pub target: &'a str,
    pub target_groups: &'a [String],
    pub action: Action,
    pub role: &'a str,
    pub duration_s: u64,
    pub reason: &'a str,
    pub ticket: Option<&'a str>,
    pub now: Timestamp,
}

/// A ticket pattern from `@require_ticket`, with the policy that set it.
#[derive(Debug, Clone)]
pub struct TicketRule {
    pub policy: String,
    pub pattern: Regex,
}

/// The obligations of the governing policies, strictest combined.
#[derive(Debug, Clone)]
pub struct Obligations {
    pub approvals: u32,
    pub approver_groups: BTreeSet<String>,
    pub max_duration_s: u64,
    pub tickets: Vec<TicketRule>,
    pub countersign_within_s: Option<u64>,
    /// `@approver_fresh_auth`: approvers must have signed in within this
    /// many seconds (the shortest window of the governing policies).
    pub approver_fresh_auth_s: Option<u64>,
    /// `@require_mfa`: the first governing policy (by id) that asks the
    /// requester for a second factor.
    pub require_mfa: Option<String>,
    /// `@review("always")`: the first governing policy (by id) whose grants
    /// always go to a person for review, findings or not.
    pub review_always: Option<String>,
}

impl Obligations {
    fn combine(&mut self, o: &Obligations) {
        self.approvals = self.approvals.max(o.approvals);
        self.approver_groups
            .extend(o.approver_groups.iter().cloned());
        self.max_duration_s = self.max_duration_s.min(o.max_duration_s);
        self.tickets.extend(o.tickets.iter().cloned());
        self.countersign_within_s = match (self.countersign_within_s, o.countersign_within_s) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.approver_fresh_auth_s = match (self.approver_fresh_auth_s, o.approver_fresh_auth_s) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if self.require_mfa.is_none() {
            self.require_mfa = o.require_mfa.clone();
        }
        if self.review_always.is_none() {
            self.review_always = o.review_always.clone();
        }
    }

    /// Every ticket pattern of every governing policy must match.
    pub fn check_ticket(&self, ticket: Option<&str>) -> Result<(), String> {
        for rule in &self.tickets {
            match ticket {
                None => {
                    return Err(format!(
                        "policy {} requires a ticket matching {}",
                        rule.policy,
                        rule.pattern.as_str()
                    ));
                }
                Some(t) if !rule.pattern.is_match(t) => {
                    return Err(format!(
                        "ticket {t:?} does not match {} required by policy {}",
                        rule.pattern.as_str(),
                        rule.policy
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} approval(s) from [{}], at most {}",
            self.approvals,
            self.approver_groups
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            format_duration(self.max_duration_s)
        );
        for t in &self.tickets {
            s.push_str(&format!(", ticket matching {}", t.pattern.as_str()));
        }
        if let Some(c) = self.countersign_within_s {
            s.push_str(&format!(
                ", emergency grants countersigned within {}",
                format_duration(c)
            ));
        }
        if let Some(w) = self.approver_fresh_auth_s {
            s.push_str(&format!(
                ", approvers signed in within {}",
                format_duration(w)
            ));
        }
        if self.require_mfa.is_some() {
            s.push_str(", requester signed in with a second factor");
        }
        if self.review_always.is_some() {
            s.push_str(", every grant reviewed by a person");
        }
        s
    }
}

/// The answer to "may this principal ask for this?", with its reasons.
#[derive(Debug, Clone)]
pub struct Decision {
    pub allowed: bool,
    /// Ids (`@id`) of the permits that matched (allowed) or the forbids that
    /// matched (denied).
    pub governing: Vec<String>,
    pub obligations: Option<Obligations>,
    /// Evaluation errors: any one of them denies.
    pub errors: Vec<String>,
}

impl Decision {
    /// One sentence on why the decision is what it is.
    pub fn explain(&self) -> String {
        if !self.errors.is_empty() {
            return format!(
                "denied because a policy failed to evaluate (fail closed): {}",
                self.errors.join("; ")
            );
        }
        match (self.allowed, &self.obligations) {
            (true, Some(ob)) => format!(
                "permitted by {}: {}",
                self.governing.join(", "),
                ob.describe()
            ),
            _ if !self.governing.is_empty() => {
                format!("forbidden by {}", self.governing.join(", "))
            }
            _ => "no permit policy matches this principal, action, target and context".into(),
        }
    }
}

struct PolicyMeta {
    name: String,
    /// `Some` for permits.
    obligations: Option<Obligations>,
    /// Who the policy's scope lets act as principal.
    requesters: Requesters,
}

/// The principal scope of a policy, as far as it can be read without
/// evaluating its conditions (which may narrow it further).
#[derive(Debug, Clone)]
enum Requesters {
    Anyone,
    Group(String),
    User(String),
}

impl Requesters {
    fn of(c: cedar_policy::PrincipalConstraint) -> Requesters {
        use cedar_policy::PrincipalConstraint as P;
        let read = |uid: &EntityUid| {
            let id = uid.id().unescaped().to_string();
            if uid.type_name().basename() == "Group" {
                Requesters::Group(id)
            } else {
                Requesters::User(id)
            }
        };
        match c {
            P::Any | P::Is(_) => Requesters::Anyone,
            P::In(uid) | P::Eq(uid) | P::IsIn(_, uid) => read(&uid),
        }
    }

    fn admits(&self, p: &Principal) -> bool {
        match self {
            Requesters::Anyone => true,
            Requesters::Group(g) => p.groups.contains(g),
            Requesters::User(u) => &p.name == u,
        }
    }
}

/// A loaded, validated policy set.
pub struct PolicyEngine {
    set: PolicySet,
    meta: BTreeMap<PolicyId, PolicyMeta>,
    authorizer: Authorizer,
    schema: Schema,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("policies", &self.policy_names())
            .finish()
    }
}

/// Line and column (1-based) of a byte offset.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = src.get(..offset).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn diag_error(file: &str, src: &str, d: &dyn Diagnostic) -> PolicyError {
    let offset = d
        .labels()
        .and_then(|mut l| l.next())
        .map_or(0, |l| l.offset());
    let (line, column) = line_col(src, offset);
    let mut reason = d.to_string();
    if let Some(help) = d.help() {
        reason.push_str(&format!(" ({help})"));
    }
    PolicyError::Invalid {
        file: file.to_string(),
        line,
        column,
        reason,
    }
}

fn schema() -> Result<Schema, String> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(s, _warnings)| s)
        .map_err(|e| e.to_string())
}

impl PolicyEngine {
    /// Parses, validates and checks the annotations of a policy set. `file`
    /// only labels errors.
    pub fn load(src: &str, file: &str) -> Result<PolicyEngine, PolicyError> {
        let file_err = |reason: String| PolicyError::File {
            file: file.to_string(),
            reason,
        };
        if src.len() > POLICY_FILE_LEN_MAX {
            return Err(file_err(format!(
                "policy file is {} bytes, the limit is {POLICY_FILE_LEN_MAX}",
                src.len()
            )));
        }
        let set = PolicySet::from_str(src).map_err(|e| diag_error(file, src, &e))?;
        if set.templates().next().is_some() {
            return Err(file_err("policy templates are not supported".into()));
        }
        let schema = schema().map_err(file_err)?;
        let validation = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
        if let Some(e) = validation.validation_errors().next() {
            return Err(diag_error(file, src, e));
        }
        // Cedar's public API does not expose where a policy starts; the core
        // parser does, under the same ids (policy0, policy1, ...).
        let locations: BTreeMap<String, usize> =
            match cedar_policy_core::parser::parse_policyset(src) {
                Ok(ast) => ast
                    .policies()
                    .filter_map(|p| p.loc().map(|l| (p.id().to_string(), l.span.offset())))
                    .collect(),
                Err(_) => BTreeMap::new(),
            };
        let mut meta = BTreeMap::new();
        let mut names = HashSet::new();
        for p in set.policies() {
            let (line, column) = line_col(
                src,
                locations.get(&p.id().to_string()).copied().unwrap_or(0),
            );
            let at = |reason: String| PolicyError::Invalid {
                file: file.to_string(),
                line,
                column,
                reason,
            };
            let name = p.annotation("id").unwrap_or(p.id().as_ref()).to_string();
            if !names.insert(name.clone()) {
                return Err(at(format!("duplicate policy @id({name:?})")));
            }
            for (key, _) in p.annotations() {
                if !KNOWN_ANNOTATIONS.contains(&key) {
                    return Err(at(format!(
                        "policy {name}: unknown annotation @{key} (known: {})",
                        KNOWN_ANNOTATIONS.join(", ")
                    )));
                }
            }
            let obligations = match p.effect() {
                cedar_policy::Effect::Permit => {
                    Some(parse_obligations(&name, |k| p.annotation(k)).map_err(at)?)
                }
                cedar_policy::Effect::Forbid => {
                    if let Some((key, _)) = p.annotations().find(|(k, _)| *k != "id") {
                        return Err(at(format!(
                            "policy {name}: @{key} has no meaning on a forbid policy"
                        )));
                    }
                    None
                }
            };
            let requesters = Requesters::of(p.principal_constraint());
            meta.insert(
                p.id().clone(),
                PolicyMeta {
                    name,
                    obligations,
                    requesters,
                },
            );
        }
        Ok(PolicyEngine {
            set,
            meta,
            authorizer: Authorizer::new(),
            schema,
        })
    }

    pub fn policy_names(&self) -> Vec<String> {
        self.meta.values().map(|m| m.name.clone()).collect()
    }

    /// Rules nobody among `principals` can satisfy: an approver group with
    /// no known member, more approvals (or a countersignature) than there
    /// are eligible people. The requester never counts, so a policy whose
    /// approvers could all be its requester is named too. One sentence per
    /// finding, naming the policy; empty when every rule can be met.
    pub fn warnings(&self, principals: &[Principal]) -> Vec<String> {
        let mut out = Vec::new();
        for m in self.meta.values() {
            let Some(ob) = &m.obligations else {
                continue;
            };
            let name = &m.name;
            for g in &ob.approver_groups {
                if !principals.iter().any(|p| p.groups.contains(g)) {
                    out.push(format!(
                        "policy {name}: approver group {g} has no known member"
                    ));
                }
            }
            let needed = ob
                .approvals
                .max(u32::from(ob.countersign_within_s.is_some()));
            if needed == 0 {
                continue;
            }
            let (what, outcome) = if ob.approvals >= needed {
                (
                    format!("@approvals(\"{}\")", ob.approvals),
                    "can never be approved",
                )
            } else {
                (
                    "a countersignature".to_string(),
                    "is always cut at its countersignature deadline",
                )
            };
            let eligible: Vec<&Principal> = principals
                .iter()
                .filter(|p| ob.approver_groups.iter().any(|g| p.groups.contains(g)))
                .collect();
            let groups = ob
                .approver_groups
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if (eligible.len() as u64) < u64::from(needed) {
                out.push(format!(
                    "policy {name}: {what} needs {needed} eligible approver(s) but only {} known principal(s) are in its approver groups ({groups}): every request it governs {outcome}",
                    eligible.len()
                ));
                continue;
            }
            // A requester who is also an eligible approver leaves one fewer.
            let could_request: Vec<&str> = eligible
                .iter()
                .filter(|p| m.requesters.admits(p))
                .map(|p| p.name.as_str())
                .collect();
            if !could_request.is_empty() && eligible.len() as u64 - 1 < u64::from(needed) {
                let who = if could_request.len() == eligible.len() {
                    "every eligible approver could be the requester".to_string()
                } else {
                    format!("{} could be the requester", could_request.join(", "))
                };
                out.push(format!(
                    "policy {name}: {what} needs {needed} eligible approver(s) other than the requester, {} known principal(s) are in its approver groups ({groups}) and {who}: a request by them {outcome}",
                    eligible.len()
                ));
            }
        }
        out
    }

    /// Decides whether `input` is permitted and under which obligations.
    pub fn evaluate(&self, input: &PolicyInput<'_>) -> Decision {
        match self.try_evaluate(input) {
            Ok(d) => d,
            Err(e) => Decision {
                allowed: false,
                governing: Vec::new(),
                obligations: None,
                errors: vec![e],
            },
        }
    }

    fn try_evaluate(&self, input: &PolicyInput<'_>) -> Result<Decision, String> {
        let uid = |ty: &str, id: &str| -> Result<EntityUid, String> {
            let ty = EntityTypeName::from_str(ty).map_err(|e| e.to_string())?;
            Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
        };
        let principal = uid("User", input.principal)?;
        let resource = uid("Target", input.target)?;
        let action = uid("Action", input.action.as_str())?;
        let mut entities = Vec::new();
        let mut parents = HashSet::new();
        for g in input.principal_groups {
            let g = uid("Group", g)?;
            entities.push(Entity::new_no_attrs(g.clone(), HashSet::new()));
            parents.insert(g);
        }
        let tags: Vec<(String, RestrictedExpression)> = input
            .authn
            .claims
            .iter()
            .map(|(k, v)| (k.clone(), RestrictedExpression::new_string(v.clone())))
            .collect();
        entities.push(
            Entity::new_with_tags(
                principal.clone(),
                [(
                    "kind".to_string(),
                    RestrictedExpression::new_string(input.kind.as_str().into()),
                )],
                parents,
                tags,
            )
            .map_err(|e| e.to_string())?,
        );
        let mut parents = HashSet::new();
        for g in input.target_groups {
            let g = uid("TargetGroup", g)?;
            entities.push(Entity::new_no_attrs(g.clone(), HashSet::new()));
            parents.insert(g);
        }
        entities.push(Entity::new_no_attrs(resource.clone(), parents));
        let entities = Entities::from_entities(entities, None).map_err(|e| e.to_string())?;
        let context = Context::from_pairs([
            (
                "role".to_string(),
                RestrictedExpression::new_string(input.role.into()),
            ),
            (
                "duration_s".to_string(),
                RestrictedExpression::new_long(i64::try_from(input.duration_s).unwrap_or(i64::MAX)),
            ),
            (
                "reason".to_string(),
                RestrictedExpression::new_string(input.reason.into()),
            ),
            (
                "ticket".to_string(),
                RestrictedExpression::new_string(input.ticket.unwrap_or("").into()),
            ),
            (
                "hour_utc".to_string(),
                RestrictedExpression::new_long(input.now.hour_utc()),
            ),
            (
                "weekday".to_string(),
                RestrictedExpression::new_long(input.now.weekday()),
            ),
            (
                "auth_method".to_string(),
                RestrictedExpression::new_string(input.authn.method.as_str().into()),
            ),
            (
                "auth_age_s".to_string(),
                RestrictedExpression::new_long(input.authn.age_s(input.now)),
            ),
            (
                "mfa".to_string(),
                RestrictedExpression::new_bool(input.authn.mfa),
            ),
        ])
        .map_err(|e| e.to_string())?;
        let request =
            cedar_policy::Request::new(principal, action, resource, context, Some(&self.schema))
                .map_err(|e| e.to_string())?;
        let response = self
            .authorizer
            .is_authorized(&request, &self.set, &entities);
        // Cedar reports reasons as a set and errors in evaluation order, both
        // unordered: sort them so the stored `policy`, the messages and the
        // first failing ticket rule are the same on every run and every node.
        let mut errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| match e {
                cedar_policy::AuthorizationError::PolicyEvaluationError(pe) => {
                    let id = pe.policy_id();
                    let name = self.meta.get(id).map_or(id.to_string(), |m| m.name.clone());
                    format!("policy {name}: {}", pe.inner())
                }
            })
            .collect();
        errors.sort();
        let mut governing_ids: Vec<&PolicyId> = response.diagnostics().reason().collect();
        governing_ids.sort_by_key(|id| {
            self.meta
                .get(*id)
                .map_or_else(|| id.to_string(), |m| m.name.clone())
        });
        let governing: Vec<String> = governing_ids
            .iter()
            .map(|id| {
                self.meta
                    .get(*id)
                    .map_or(id.to_string(), |m| m.name.clone())
            })
            .collect();
        // INVARIANT: fail closed. An erroring policy might have been a forbid.
        if !errors.is_empty() || response.decision() != CedarDecision::Allow {
            return Ok(Decision {
                allowed: false,
                governing: if errors.is_empty() {
                    governing
                } else {
                    Vec::new()
                },
                obligations: None,
                errors,
            });
        }
        let mut combined: Option<Obligations> = None;
        for id in governing_ids {
            let Some(ob) = self.meta.get(id).and_then(|m| m.obligations.as_ref()) else {
                continue;
            };
            match combined.as_mut() {
                Some(c) => c.combine(ob),
                None => combined = Some(ob.clone()),
            }
        }
        match combined {
            Some(ob) => Ok(Decision {
                allowed: true,
                governing,
                obligations: Some(ob),
                errors,
            }),
            None => Err("allowed without a governing permit".into()),
        }
    }
}

fn parse_obligations<'a>(
    name: &str,
    get: impl Fn(&str) -> Option<&'a str>,
) -> Result<Obligations, String> {
    let approvals_text = get("approvals")
        .ok_or_else(|| format!("policy {name}: a permit needs @approvals(\"N\")"))?;
    let digits = approvals_text.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "policy {name}: @approvals({approvals_text:?}) is not a whole number"
        ));
    }
    let approvals: u32 = digits.parse().map_err(|_| {
        format!("policy {name}: @approvals({approvals_text:?}) is not a whole number")
    })?;
    if approvals > APPROVALS_MAX {
        return Err(format!(
            "policy {name}: @approvals({approvals}) is more than the maximum of {APPROVALS_MAX}"
        ));
    }
    let max_text = get("max_duration")
        .ok_or_else(|| format!("policy {name}: a permit needs @max_duration(\"15m\")"))?;
    let max_duration_s =
        parse_duration(max_text).map_err(|e| format!("policy {name}: @max_duration: {e}"))?;
    let approver_groups: BTreeSet<String> = get("approvers")
        .unwrap_or("")
        .split(',')
        .map(|g| g.trim().to_string())
        .filter(|g| !g.is_empty())
        .collect();
    let countersign_within_s = get("countersign_within")
        .map(|t| parse_duration(t).map_err(|e| format!("policy {name}: @countersign_within: {e}")))
        .transpose()?;
    if let (Some(c), Some(text)) = (countersign_within_s, get("countersign_within"))
        && c >= max_duration_s
    {
        return Err(format!(
            "policy {name}: @countersign_within({text:?}) must be shorter than @max_duration({max_text:?}): a countersignature due when the grant ends anyway cuts nothing"
        ));
    }
    if approver_groups.is_empty() && (approvals > 0 || countersign_within_s.is_some()) {
        return Err(format!(
            "policy {name}: @approvers(\"group,...\") is required when approvals or a countersignature are needed"
        ));
    }
    let tickets = match get("require_ticket") {
        Some(p) => {
            let pattern = regex::RegexBuilder::new(p)
                .size_limit(TICKET_REGEX_SIZE_MAX)
                .build()
                .map_err(|e| {
                    format!("policy {name}: @require_ticket is not a valid pattern: {e}")
                })?;
            vec![TicketRule {
                policy: name.to_string(),
                pattern,
            }]
        }
        None => Vec::new(),
    };
    let approver_fresh_auth_s = get("approver_fresh_auth")
        .map(|t| parse_duration(t).map_err(|e| format!("policy {name}: @approver_fresh_auth: {e}")))
        .transpose()?;
    if approver_fresh_auth_s.is_some() && approver_groups.is_empty() {
        return Err(format!(
            "policy {name}: @approver_fresh_auth needs @approvers(\"group,...\"): it is about approvers"
        ));
    }
    let require_mfa = match get("require_mfa").map(str::trim) {
        None => None,
        Some("" | "true") => Some(name.to_string()),
        Some(other) => {
            return Err(format!(
                "policy {name}: @require_mfa takes no value (or \"true\"), got {other:?}"
            ));
        }
    };
    // `@review("always")`: a person reviews every grant. `"auto"` (the
    // default) lets the service close grants whose summary flags nothing.
    let review_always = match get("review").map(str::trim) {
        None | Some("auto") => None,
        Some("always") => {
            if approver_groups.is_empty() {
                return Err(format!(
                    "policy {name}: @review(\"always\") needs @approvers(\"group,...\"): approvers review"
                ));
            }
            Some(name.to_string())
        }
        Some(other) => {
            return Err(format!(
                "policy {name}: @review takes \"always\" or \"auto\", got {other:?}"
            ));
        }
    };
    Ok(Obligations {
        approvals,
        approver_groups,
        max_duration_s,
        tickets,
        countersign_within_s,
        approver_fresh_auth_s,
        require_mfa,
        review_always,
    })
}
