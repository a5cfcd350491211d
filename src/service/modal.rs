//! `/access` alone opens the request modal; its submission goes through the
//! same checks and the same `submit` as a typed command.

use std::sync::Arc;

use super::{Service, SlashCommand};
use crate::domain::form::{self, Field, FieldErrors, RequestForm};
use crate::domain::policy::listed;
use crate::slack::modal::{self, Offer};

impl Service {
    /// What `user` may request: clusters with at least one role whose
    /// `requesters` admit them.
    pub(super) async fn offer_for(&self, user: &str) -> Offer {
        let lists: Vec<String> = self
            .config
            .clusters
            .iter()
            .flat_map(|c| c.roles.values().flat_map(|r| r.requesters.iter().cloned()))
            .collect();
        let members = self
            .group_members(&lists, crate::domain::directory::Need::Recent)
            .await;
        self.config
            .clusters
            .iter()
            .filter_map(|c| {
                let roles: Vec<String> = c
                    .roles
                    .values()
                    .filter(|r| r.requesters.is_empty() || listed(&r.requesters, user, &members))
                    .map(|r| r.name.clone())
                    .collect();
                (!roles.is_empty()).then(|| (c.name.clone(), roles))
            })
            .collect()
    }

    /// The empty string means the modal is open and nothing more is said.
    pub(super) async fn open_request_modal(&self, cmd: &SlashCommand) -> String {
        let Some(trigger) = cmd.trigger_id.as_deref().filter(|t| !t.is_empty()) else {
            return crate::domain::command::USAGE.to_string();
        };
        let offer = self.offer_for(&cmd.user_id).await;
        if offer.is_empty() {
            return "There is nothing you may request: every role has a `requesters` list without you. Ask an admin.".into();
        }
        let view = modal::request_view(&offer, cmd.response_url.as_deref());
        match self.slack.open_view(trigger, &view).await {
            Ok(()) => String::new(),
            Err(e) => {
                tracing::warn!(error = %e, "views.open failed");
                format!(
                    "Tollgate could not open the request form ({e}). Type the request instead: {}",
                    crate::domain::command::USAGE
                )
            }
        }
    }

    /// A submitted modal: field errors keep it open; otherwise the request
    /// is recorded and the receipt follows through the command's
    /// response_url.
    pub async fn submit_form(
        self: &Arc<Self>,
        user_id: &str,
        form: &RequestForm,
        response_url: Option<String>,
    ) -> Result<(), FieldErrors> {
        let offer = self.offer_for(user_id).await;
        let allowed = offer
            .iter()
            .find(|(c, _)| *c == form.cluster)
            .map(|(_, roles)| roles.clone());
        match &allowed {
            None => {
                return Err(vec![(
                    Field::Cluster,
                    "Choose one of the clusters offered.".into(),
                )])
            }
            Some(roles) if !roles.contains(&form.role) && !form.role.is_empty() => {
                return Err(vec![(
                    Field::Role,
                    format!("On {} you may request: {}.", form.cluster, roles.join(", ")),
                )])
            }
            Some(_) => {}
        }
        let args = form::check(form, &self.config.clusters)?;
        let cmd = SlashCommand {
            user_id: user_id.to_string(),
            text: String::new(),
            response_url: response_url.clone(),
            trigger_id: None,
        };
        // Refusals past the form's own checks (profile lookup, group
        // membership) are about who asks for what: shown under the role.
        let receipt = self
            .submit(&cmd, args)
            .await
            .map_err(|why| vec![(Field::Role, crate::slack::blocks::refusal_text(&why))])?;
        let service = Arc::clone(self);
        let user = user_id.to_string();
        tokio::spawn(async move {
            match response_url {
                Some(url) => service.follow_up(Some(&url), receipt).await,
                None => {
                    service
                        .dm(&user, crate::slack::Message::plain(receipt))
                        .await
                }
            }
        });
        Ok(())
    }
}
