defmodule SseGateway.Event do
  @moduledoc """
  One event to publish, validated once: either to named `topics`
  (`POST /publish`) or through a broadcast `route` (`"projects/project"`,
  `POST /projects/broadcast/project`), with its idempotency `key`, made
  when the event is created so that every retry of it carries the same one.

  Also an event as received from a stream (`id`, `event`, `data`, `topics`
  as subscribed).
  """

  alias SseGateway.Error

  defstruct [:id, :topics, :route, :event, :data, :key]

  @type t :: %__MODULE__{
          id: String.t() | nil,
          topics: [String.t()] | nil,
          route: String.t() | nil,
          event: String.t(),
          data: term(),
          key: String.t() | nil
        }

  # Byte checks rather than regexes in module attributes (which OTP 28 can
  # no longer compile into a module).
  defp topic?(t), do: is_binary(t) and byte_size(t) in 1..200 and all?(t, &topic_byte?/1)
  defp event?(e), do: byte_size(e) in 1..100 and all?(e, &event_byte?/1)
  defp key?(k), do: byte_size(k) in 1..255 and all?(k, &(&1 in 0x21..0x7E))

  defp all?(bin, fun), do: for(<<c <- bin>>, reduce: true, do: (acc -> acc and fun.(c)))

  defp alnum?(c), do: c in ?A..?Z or c in ?a..?z or c in ?0..?9
  defp topic_byte?(c), do: alnum?(c) or c in ~c"._~:@-"
  defp event_byte?(c), do: alnum?(c) or c in ~c"._:-"

  @doc "A fresh idempotency key: 128 random bits, URL-safe base64 (22 characters)."
  @spec new_key() :: String.t()
  def new_key, do: :crypto.strong_rand_bytes(16) |> Base.url_encode64(padding: false)

  @doc "An event to `topics` (a name or a list of 1 to 64)."
  @spec to_topics(String.t() | [String.t()], atom() | String.t() | nil, term(), keyword()) ::
          {:ok, t()} | {:error, Error.t()}
  def to_topics(topics, event, data, opts \\ []) do
    topics = topics |> List.wrap() |> Enum.uniq()

    with :ok <- check_topics(topics),
         {:ok, name} <- event_name(event || "message"),
         {:ok, key} <- key(opts) do
      {:ok, %__MODULE__{topics: topics, event: name, data: data, key: key}}
    end
  end

  @doc "An event through broadcast route `module/kind`, payload a map."
  @spec to_route(String.t(), atom() | String.t(), map(), keyword()) ::
          {:ok, t()} | {:error, Error.t()}
  def to_route(route, event, payload, opts \\ []) do
    with {:ok, name} <- event_name(event),
         :ok <- check_payload(payload),
         {:ok, key} <- key(opts) do
      {:ok, %__MODULE__{route: route, event: name, data: payload, key: key}}
    end
  end

  @doc "The single-publish request: `{path, body}`."
  @spec request(t()) :: {String.t(), map()}
  def request(%__MODULE__{route: nil} = e),
    do: {"/publish", %{"topics" => e.topics, "event" => e.event, "data" => e.data}}

  def request(%__MODULE__{route: route} = e) do
    [module, kind] = String.split(route, "/", parts: 2)
    {"/#{module}/broadcast/#{kind}", %{"event" => e.event, "payload" => e.data}}
  end

  @doc "The item of a `POST /publish/batch` body."
  @spec batch_item(t()) :: map()
  def batch_item(%__MODULE__{route: nil} = e) do
    %{"topics" => e.topics, "event" => e.event, "data" => e.data}
    |> put_key(e.key)
  end

  def batch_item(%__MODULE__{} = e) do
    %{"route" => e.route, "event" => e.event, "payload" => e.data}
    |> put_key(e.key)
  end

  defp put_key(item, nil), do: item
  defp put_key(item, key), do: Map.put(item, "idempotency_key", key)

  defp key(opts) do
    case Keyword.get(opts, :idempotency_key) do
      nil ->
        {:ok, new_key()}

      key when is_binary(key) ->
        if key?(key),
          do: {:ok, key},
          else:
            invalid(
              "invalid_idempotency_key",
              "an idempotency key is 1 to 255 visible ASCII characters"
            )

      other ->
        invalid(
          "invalid_idempotency_key",
          "an idempotency key is a string, got #{inspect(other)}"
        )
    end
  end

  @doc false
  def check_topics([]), do: invalid("invalid_topic", "give 1 to 64 topics")

  def check_topics(topics) when length(topics) > 64,
    do: invalid("invalid_topic", "at most 64 topics per event, got #{length(topics)}")

  def check_topics(topics) do
    case Enum.find(topics, &(not topic?(&1))) do
      nil ->
        :ok

      bad ->
        invalid(
          "invalid_topic",
          "invalid topic #{inspect(bad)}: a topic is 1 to 200 bytes of [A-Za-z0-9._~:@-]"
        )
    end
  end

  defp event_name(event) when is_atom(event) and not is_nil(event),
    do: event_name(Atom.to_string(event))

  defp event_name("reset"),
    do: invalid("invalid_event", "the event name `reset` is reserved for the gateway")

  defp event_name(event) when is_binary(event) do
    if event?(event),
      do: {:ok, event},
      else:
        invalid(
          "invalid_event",
          "invalid event name #{inspect(event)}: 1 to 100 bytes of [A-Za-z0-9._:-]"
        )
  end

  defp event_name(event),
    do: invalid("invalid_event", "an event name is an atom or string, got #{inspect(event)}")

  defp check_payload(p) when is_map(p) and not is_struct(p), do: :ok

  defp check_payload(p),
    do: invalid("invalid_payload", "a broadcast payload is a map, got #{inspect(p)}")

  defp invalid(code, message), do: {:error, %Error{code: code, message: message}}
end
