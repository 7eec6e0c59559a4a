//! SNS FIFO topic and SQS FIFO queues (DESIGN §5.1, §5.2).
//!
//! The SDK reads its standard environment: `AWS_ENDPOINT_URL` (moto in tests), region and
//! credentials. [`init`] builds the topology idempotently: the FIFO topic, and for each group a
//! FIFO queue in high-throughput mode with a DLQ and redrive policy, subscribed to the topic
//! with raw delivery and its filter policy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use serde::Serialize;

use crate::message::EventMessage;
use crate::topology::{Group, Names};
use crate::{Bus, BusError, Delivery, Publisher, Queue};

/// How many receives before SQS moves a message to the DLQ (`bus/topology.json`'s
/// `dead_letter.max_receive_count`). The consumer parks an aggregate sooner
/// (`park_after_receives`) when an effect keeps failing, so this catches messages the consumer
/// cannot read, messages whose event the log does not hold, and slow work after a committed
/// effect that keeps failing (`Apply::after_commit`).
pub fn max_receive_count() -> u32 {
    crate::topology::topology().dead_letter.max_receive_count
}

fn chain(e: &dyn std::error::Error) -> String {
    // The SDK's Display is terse; walk the sources for the reason.
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn transport(e: impl std::error::Error) -> BusError {
    BusError::Transport(chain(&e))
}

/// Classifies an SDK error: an unreachable endpoint and rejected credentials are
/// configuration errors that name their setting; the rest is transport.
fn sdk<E>(e: aws_sdk_sqs::error::SdkError<E, aws_smithy_runtime_api::client::orchestrator::HttpResponse>) -> BusError
where
    E: aws_sdk_sqs::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_sqs::error::SdkError;
    const REFUSED: &[&str] = &[
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "InvalidAccessKeyId",
        "AccessDenied",
        "AccessDeniedException",
        "AuthorizationError",
        "InvalidSecurity",
    ];
    match &e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => BusError::Config {
            setting: "AWS_ENDPOINT_URL",
            reason: format!("cannot reach the AWS endpoint: {}", chain(&e)),
        },
        SdkError::ServiceError(s) => {
            let code = s.err().code();
            // A 403 whose body the SDK could not read is a refusal of the credentials too.
            if code.is_some_and(|c| REFUSED.contains(&c)) || (code.is_none() && s.raw().status().as_u16() == 403) {
                BusError::Config {
                    setting: "AWS_ACCESS_KEY_ID",
                    reason: format!(
                        "AWS refused the credentials ({}): {}",
                        code.unwrap_or("HTTP 403"),
                        s.err()
                            .message()
                            .unwrap_or("check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
                    ),
                }
            } else {
                transport(e)
            }
        }
        _ => transport(e),
    }
}

/// Fails early, naming the setting, when no credentials can be found.
pub async fn check_credentials(config: &aws_config::SdkConfig) -> Result<(), BusError> {
    use aws_credential_types::provider::ProvideCredentials;
    let missing = |reason: String| BusError::Config {
        setting: "AWS_ACCESS_KEY_ID",
        reason,
    };
    let provider = config
        .credentials_provider()
        .ok_or_else(|| missing("no AWS credentials provider is configured".into()))?;
    provider.provide_credentials().await.map(|_| ()).map_err(|e| {
        missing(format!(
            "no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile): {}",
            chain(&e)
        ))
    })
}

/// SDK configuration from the standard environment, with `region` when given.
pub async fn sdk_config(region: Option<&str>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r.to_owned()));
    }
    loader.load().await
}

#[derive(Debug, Clone, Serialize)]
pub struct TopologyInfo {
    pub topic_arn: String,
    pub queues: Vec<QueueInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueInfo {
    pub group: Group,
    pub url: String,
    pub arn: String,
    pub dlq_url: String,
    pub dlq_arn: String,
    pub subscription_arn: String,
}

async fn queue_arn(sqs: &aws_sdk_sqs::Client, url: &str) -> Result<String, BusError> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(sdk)?;
    out.attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .ok_or_else(|| BusError::Transport(format!("queue {url} has no ARN")))
}

async fn create_queue(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    attrs: HashMap<QueueAttributeName, String>,
) -> Result<String, BusError> {
    let out = sqs
        .create_queue()
        .queue_name(name)
        .set_attributes(Some(attrs))
        .send()
        .await
        .map_err(sdk)?;
    out.queue_url()
        .map(str::to_owned)
        .ok_or_else(|| BusError::Transport(format!("no URL for queue {name}")))
}

/// Every queue's attributes, from `bus/topology.json`.
fn fifo_attrs() -> HashMap<QueueAttributeName, String> {
    crate::topology::topology()
        .queue_attributes
        .iter()
        .map(|(k, v)| (QueueAttributeName::from(k.as_str()), v.clone()))
        .collect()
}

/// Creates (or finds) the whole topology. Safe to run again: it converges on the same one.
pub async fn init(config: &aws_config::SdkConfig, names: &Names) -> Result<TopologyInfo, BusError> {
    check_credentials(config).await?;
    let sns = &aws_sdk_sns::Client::new(config);
    let sqs = &aws_sdk_sqs::Client::new(config);
    if !names.topic.ends_with(".fifo") {
        return Err(BusError::Config {
            setting: "AWS__SNS__TopicName",
            reason: format!("{} must end in .fifo", names.topic),
        });
    }
    let topic = sns
        .create_topic()
        .name(&names.topic)
        .set_attributes(Some(
            crate::topology::topology()
                .topic
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ))
        .send()
        .await
        .map_err(sdk)?;
    let topic_arn = topic
        .topic_arn()
        .ok_or_else(|| BusError::Transport("no topic ARN".into()))?
        .to_owned();
    let existing = list_subscriptions(sns, &topic_arn).await?;
    let mut queues = Vec::new();
    for g in Group::ALL {
        let dlq_url = create_queue(sqs, &names.dlq(g), fifo_attrs()).await?;
        let dlq_arn = queue_arn(sqs, &dlq_url).await?;
        let mut attrs = fifo_attrs();
        attrs.insert(
            QueueAttributeName::RedrivePolicy,
            serde_json::json!({ "deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receive_count().to_string() })
                .to_string(),
        );
        // Created FIFO with the file's attributes (SQS fixes `FifoQueue` at creation), then given
        // its redrive and policy, which need the ARNs.
        let url = create_queue(sqs, &names.queue(g), fifo_attrs()).await?;
        let arn = queue_arn(sqs, &url).await?;
        // Let the topic deliver to the queue.
        attrs.insert(
            QueueAttributeName::Policy,
            serde_json::json!({
                "Version": "2012-10-17",
                "Statement": [{
                    "Effect": "Allow",
                    "Principal": { "Service": "sns.amazonaws.com" },
                    "Action": "sqs:SendMessage",
                    "Resource": arn,
                    "Condition": { "ArnEquals": { "aws:SourceArn": topic_arn } }
                }]
            })
            .to_string(),
        );
        attrs.remove(&QueueAttributeName::FifoQueue);
        sqs.set_queue_attributes()
            .queue_url(&url)
            .set_attributes(Some(attrs))
            .send()
            .await
            .map_err(sdk)?;
        let subscription_arn = match existing.iter().find(|(endpoint, _)| endpoint == &arn) {
            Some((_, sub)) => sub.clone(),
            None => sns
                .subscribe()
                .topic_arn(&topic_arn)
                .protocol("sqs")
                .endpoint(&arn)
                .set_attributes(Some(
                    crate::topology::topology()
                        .subscription_attributes
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                ))
                .return_subscription_arn(true)
                .send()
                .await
                .map_err(sdk)?
                .subscription_arn()
                .unwrap_or_default()
                .to_owned(),
        };
        let filter = g.filter_policy().map(|f| f.to_string());
        if let Some(f) = &filter {
            sns.set_subscription_attributes()
                .subscription_arn(&subscription_arn)
                .attribute_name("FilterPolicy")
                .attribute_value(f)
                .send()
                .await
                .map_err(sdk)?;
        }
        queues.push(QueueInfo {
            group: g,
            url,
            arn,
            dlq_url,
            dlq_arn,
            subscription_arn,
        });
    }
    Ok(TopologyInfo { topic_arn, queues })
}

async fn list_subscriptions(sns: &aws_sdk_sns::Client, topic_arn: &str) -> Result<Vec<(String, String)>, BusError> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let page = sns
            .list_subscriptions_by_topic()
            .topic_arn(topic_arn)
            .set_next_token(token)
            .send()
            .await
            .map_err(sdk)?;
        for s in page.subscriptions() {
            if let (Some(e), Some(a)) = (s.endpoint(), s.subscription_arn()) {
                out.push((e.to_owned(), a.to_owned()));
            }
        }
        token = page.next_token().map(str::to_owned);
        if token.is_none() {
            return Ok(out);
        }
    }
}

/// Finds the existing topology without creating anything; a missing topic or queue is a
/// configuration error naming its setting.
pub async fn lookup(
    sns: &aws_sdk_sns::Client,
    sqs: &aws_sdk_sqs::Client,
    names: &Names,
) -> Result<(String, HashMap<Group, (String, String)>), BusError> {
    let mut topic_arn = None;
    let mut token = None;
    loop {
        let page = sns.list_topics().set_next_token(token).send().await.map_err(sdk)?;
        for t in page.topics() {
            if let Some(arn) = t.topic_arn() {
                if arn.rsplit(':').next() == Some(names.topic.as_str()) {
                    topic_arn = Some(arn.to_owned());
                }
            }
        }
        token = page.next_token().map(str::to_owned);
        if token.is_none() || topic_arn.is_some() {
            break;
        }
    }
    let topic_arn = topic_arn.ok_or_else(|| BusError::Config {
        setting: "AWS__SNS__TopicName",
        reason: format!("topic {} does not exist (run `mira bus init`)", names.topic),
    })?;
    let mut queues = HashMap::new();
    for g in Group::ALL {
        let url = |name: String| async move {
            sqs.get_queue_url()
                .queue_name(&name)
                .send()
                .await
                .ok()
                .and_then(|o| o.queue_url().map(str::to_owned))
                .ok_or(BusError::Config {
                    setting: "AWS__SQS__QueuePrefix",
                    reason: format!("queue {name} does not exist (run `mira bus init`)"),
                })
        };
        queues.insert(g, (url(names.queue(g)).await?, url(names.dlq(g)).await?));
    }
    Ok((topic_arn, queues))
}

fn attr(v: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .expect("data type is set")
}

/// Publishes to the FIFO topic with `PublishBatch`.
#[derive(Debug, Clone)]
pub struct SnsPublisher {
    sns: aws_sdk_sns::Client,
    topic_arn: String,
}

impl SnsPublisher {
    pub fn new(sns: aws_sdk_sns::Client, topic_arn: String) -> Self {
        Self { sns, topic_arn }
    }
}

#[async_trait::async_trait]
impl Publisher for SnsPublisher {
    async fn publish(&self, batch: &[EventMessage]) -> Result<Vec<usize>, BusError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut req = self.sns.publish_batch().topic_arn(&self.topic_arn);
        for (i, m) in batch.iter().enumerate() {
            let mut entry = PublishBatchRequestEntry::builder()
                .id(i.to_string())
                .message(m.to_body())
                .message_group_id(m.group_id())
                .message_deduplication_id(m.event_id.to_string());
            // The attributes the filter policies can name (bus/topology.json).
            for name in &crate::topology::topology().message_attributes {
                if let Some(v) = m.attribute(name) {
                    entry = entry.message_attributes(name.clone(), attr(v));
                }
            }
            let entry = entry.build().map_err(transport)?;
            req = req.publish_batch_request_entries(entry);
        }
        let out = req.send().await.map_err(sdk)?;
        Ok(out
            .failed()
            .iter()
            .filter_map(|f| f.id().parse::<usize>().ok())
            .collect())
    }
}

/// One SQS FIFO queue and its DLQ.
#[derive(Debug, Clone)]
pub struct SqsQueue {
    sqs: aws_sdk_sqs::Client,
    url: String,
    dlq_url: String,
    visibility: Option<Duration>,
    /// The group's name, for `/metrics`.
    label: &'static str,
}

impl SqsQueue {
    /// `visibility` overrides the queue's visibility timeout on each receive.
    pub fn new(sqs: aws_sdk_sqs::Client, url: String, dlq_url: String, visibility: Option<Duration>) -> Self {
        Self {
            sqs,
            url,
            dlq_url,
            visibility,
            label: "sqs",
        }
    }

    /// The same queue, its metrics labelled with its group's name.
    pub fn labelled(mut self, label: &'static str) -> Self {
        self.label = label;
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

fn secs(d: Duration) -> i32 {
    d.as_secs().min(43_200) as i32
}

#[async_trait::async_trait]
impl Queue for SqsQueue {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        let out = self
            .sqs
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(secs(wait).min(20))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .set_visibility_timeout(self.visibility.map(secs))
            .send()
            .await
            .map_err(sdk)?;
        let now = std::time::SystemTime::now();
        Ok(out
            .messages()
            .iter()
            .filter_map(|m| {
                let attr = |a: MessageSystemAttributeName| m.attributes().and_then(|m| m.get(&a));
                // The first receipt only: a redelivery's wait is the consumer's, not the queue's.
                if attr(MessageSystemAttributeName::ApproximateReceiveCount).map(String::as_str) == Some("1") {
                    if let Some(sent) =
                        attr(MessageSystemAttributeName::SentTimestamp).and_then(|t| t.parse::<u64>().ok())
                    {
                        let sent = std::time::UNIX_EPOCH + Duration::from_millis(sent);
                        crate::record_receive_delay(self.label, now.duration_since(sent).unwrap_or_default());
                    }
                }
                Some(Delivery {
                    body: m.body()?.to_owned(),
                    receipt: m.receipt_handle()?.to_owned(),
                    receive_count: m
                        .attributes()
                        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(1),
                })
            })
            .collect())
    }

    async fn delete(&self, receipt: &str) -> Result<(), BusError> {
        self.sqs
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(sdk)?;
        Ok(())
    }

    async fn extend(&self, receipt: &str, visibility: Duration) -> Result<(), BusError> {
        self.sqs
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(secs(visibility))
            .send()
            .await
            .map_err(sdk)?;
        Ok(())
    }

    async fn release(&self, receipt: &str, delay: Duration) -> Result<(), BusError> {
        self.extend(receipt, delay).await
    }

    async fn dead_letter_count(&self) -> Result<u64, BusError> {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.dlq_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .map_err(sdk)?;
        Ok(out
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessages))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }

    async fn depth(&self) -> Result<crate::QueueDepth, BusError> {
        let count = |url: &str| {
            self.sqs
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
                .send()
        };
        let (q, dlq) = (
            count(&self.url).await.map_err(sdk)?,
            count(&self.dlq_url).await.map_err(sdk)?,
        );
        let n = |out: &aws_sdk_sqs::operation::get_queue_attributes::GetQueueAttributesOutput,
                 a: QueueAttributeName| {
            out.attributes()
                .and_then(|m| m.get(&a))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(crate::QueueDepth {
            visible: n(&q, QueueAttributeName::ApproximateNumberOfMessages),
            in_flight: n(&q, QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            delayed: n(&q, QueueAttributeName::ApproximateNumberOfMessagesDelayed),
            dead_letters: n(&dlq, QueueAttributeName::ApproximateNumberOfMessages),
            oldest_age: None,
        })
    }

    async fn redrive_dead_letters(&self) -> Result<u64, BusError> {
        let mut moved = 0;
        loop {
            let out = self
                .sqs
                .receive_message()
                .queue_url(&self.dlq_url)
                .max_number_of_messages(10)
                .send()
                .await
                .map_err(sdk)?;
            if out.messages().is_empty() {
                return Ok(moved);
            }
            for m in out.messages() {
                let (Some(body), Some(receipt)) = (m.body(), m.receipt_handle()) else {
                    continue;
                };
                let (group, dedup) = match EventMessage::from_body(body) {
                    Ok(e) => (
                        e.group_id(),
                        format!("{}-redrive-{}", e.event_id, uuid::Uuid::new_v4().simple()),
                    ),
                    Err(_) => ("unreadable".to_owned(), uuid::Uuid::new_v4().to_string()),
                };
                self.sqs
                    .send_message()
                    .queue_url(&self.url)
                    .message_body(body)
                    .message_group_id(group)
                    .message_deduplication_id(dedup)
                    .send()
                    .await
                    .map_err(sdk)?;
                self.sqs
                    .delete_message()
                    .queue_url(&self.dlq_url)
                    .receipt_handle(receipt)
                    .send()
                    .await
                    .map_err(sdk)?;
                moved += 1;
            }
        }
    }
}

/// The topic and queues on AWS (or moto).
#[derive(Debug, Clone)]
pub struct AwsBus {
    publisher: Arc<SnsPublisher>,
    queues: HashMap<Group, Arc<SqsQueue>>,
}

impl AwsBus {
    /// Connects to an existing topology (see [`lookup`]). `visibility` overrides the queues'
    /// visibility timeout on each receive.
    pub async fn connect(
        config: &aws_config::SdkConfig,
        names: &Names,
        visibility: Option<Duration>,
    ) -> Result<Self, BusError> {
        let sns = aws_sdk_sns::Client::new(config);
        let sqs = aws_sdk_sqs::Client::new(config);
        let (topic_arn, urls) = lookup(&sns, &sqs, names).await?;
        let queues = urls
            .into_iter()
            .map(|(g, (url, dlq))| {
                (
                    g,
                    Arc::new(SqsQueue::new(sqs.clone(), url, dlq, visibility).labelled(g.suffix())),
                )
            })
            .collect();
        Ok(Self {
            publisher: Arc::new(SnsPublisher::new(sns, topic_arn)),
            queues,
        })
    }
}

impl Bus for AwsBus {
    fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher.clone()
    }

    fn queue(&self, group: Group) -> Arc<dyn Queue> {
        self.queues[&group].clone()
    }
}
