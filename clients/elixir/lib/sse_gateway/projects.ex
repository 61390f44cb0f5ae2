defmodule SseGateway.Projects do
  @moduledoc """
  `PhoenixKitProjects.PubSub` over the gateway: the same functions, names and
  arities, so code written against the module can call this one.

  - `broadcast_project/2`, `broadcast_task/2`, `broadcast_assignment/2`,
    `broadcast_dependency/2` take the event atom and the payload map and go
    through `POST /projects/broadcast/{kind}`: the gateway puts the event on
    the module's topics (`projects:all`, `projects:project:<uuid>`,
    `projects:tasks`, `projects:templates`) by the same rules. They answer as
    `SseGateway.publish/4` in the configured mode: `{:ok, id}` (sync), `:ok`
    (async), or `{:error, %SseGateway.Error{}}`.
  - `subscribe/1` subscribes the calling process to one topic; it then
    receives `{:projects, event, payload}` as from the module (`event` an
    existing atom, else a string; `payload` with string keys) and, when
    history it needed is gone, `{:sse_gateway, :reset, info}`.
  - `topic_*` return the module's topic names.

  Each function takes an optional last argument of options
  (`SseGateway.publish/4`, `SseGateway.subscribe/2`).
  """

  @doc "Topic for any project, template, task, or assignment mutation."
  def topic_all, do: "projects:all"

  @doc "Topic for task-library mutations."
  def topic_tasks, do: "projects:tasks"

  @doc "Topic for template-project mutations."
  def topic_templates, do: "projects:templates"

  @doc """
  Topic scoped to a single project. A UUID in any spelling the gateway
  accepts (upper case, braces, `urn:uuid:`, no hyphens) is written lowercase
  and hyphenated, as the gateway routes it.
  """
  def topic_project(uuid), do: "projects:project:" <> normalize_uuid(to_string(uuid))

  @doc "Broadcasts a project event. Templates also fan out to the templates topic."
  def broadcast_project(event, payload, opts \\ []),
    do: broadcast("project", event, payload, opts)

  @doc "Broadcasts a task-library event to the all-projects and tasks topics."
  def broadcast_task(event, payload, opts \\ []), do: broadcast("task", event, payload, opts)

  @doc "Broadcasts an assignment event to the all-projects and the parent project's topic."
  def broadcast_assignment(event, payload, opts \\ []),
    do: broadcast("assignment", event, payload, opts)

  @doc "Broadcasts a dependency event to the all-projects and the parent project's topic."
  def broadcast_dependency(event, payload, opts \\ []),
    do: broadcast("dependency", event, payload, opts)

  @doc "Subscribes the calling process to the given topic."
  def subscribe(topic, opts \\ []),
    do: SseGateway.subscribe(topic, Keyword.put_new(opts, :format, :projects))

  @doc "Unsubscribes the calling process from the given topic."
  def unsubscribe(topic), do: SseGateway.unsubscribe(topic)

  defp broadcast(kind, event, payload, opts),
    do: SseGateway.broadcast("projects", kind, event, payload, opts)

  @doc """
  The topics the gateway's shipped routes give a broadcast of `kind` with
  `payload` (`{:ok, topics}`, or `{:error, %SseGateway.Error{code:
  "invalid_payload"}}`): used by `SseGateway.Test` to deliver without a gateway.
  """
  @spec topics_for(String.t(), map()) :: {:ok, [String.t()]} | {:error, SseGateway.Error.t()}
  def topics_for(kind, payload) do
    payload = Map.new(payload, fn {k, v} -> {to_string(k), v} end)

    case kind do
      "project" ->
        with {:ok, uuid} <- uuid_field(payload, "uuid") do
          templates = if payload["is_template"] == true, do: [topic_templates()], else: []
          {:ok, [topic_all(), "projects:project:" <> uuid] ++ templates}
        end

      "task" ->
        {:ok, [topic_all(), topic_tasks()]}

      k when k in ["assignment", "dependency"] ->
        with {:ok, uuid} <- uuid_field(payload, "project_uuid") do
          {:ok, [topic_all(), "projects:project:" <> uuid]}
        end

      other ->
        {:error,
         %SseGateway.Error{
           status: 404,
           code: "not_found",
           message: "no broadcast route projects/#{other}"
         }}
    end
  end

  defp uuid_field(payload, field) do
    with v when is_binary(v) <- payload[field],
         {:ok, uuid} <- parse_uuid(v) do
      {:ok, uuid}
    else
      _ ->
        {:error,
         %SseGateway.Error{
           status: 422,
           code: "invalid_payload",
           message: "payload.#{field} must be a UUID string"
         }}
    end
  end

  defp normalize_uuid(s) do
    case parse_uuid(s) do
      {:ok, uuid} -> uuid
      :error -> s
    end
  end

  # The spellings Rust's uuid::Uuid::parse_str takes: hyphenated, simple
  # (32 hex digits), braced, and urn:uuid:.
  @doc false
  def parse_uuid(s) do
    s =
      cond do
        String.starts_with?(s, "urn:uuid:") -> String.replace_prefix(s, "urn:uuid:", "")
        String.starts_with?(s, "{") and String.ends_with?(s, "}") -> String.slice(s, 1..-2//1)
        true -> s
      end

    hex =
      cond do
        s =~ ~r/\A[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\z/ ->
          String.replace(s, "-", "")

        s =~ ~r/\A[0-9a-fA-F]{32}\z/ ->
          s

        true ->
          nil
      end

    case hex do
      nil ->
        :error

      hex ->
        <<a::binary-8, b::binary-4, c::binary-4, d::binary-4, e::binary-12>> =
          String.downcase(hex)

        {:ok, Enum.join([a, b, c, d, e], "-")}
    end
  end
end
