defmodule SseGateway.Sync do
  @moduledoc """
  Synchronous delivery: one event, one request, in the caller's process.

  The event's idempotency key goes in the `Idempotency-Key` header; a transient
  failure (no answer, timeout, `429`, `502`–`504`) is retried up to
  `retries` times with the same key after `Retry-After` or a jittered backoff,
  so the gateway stores it at most once.
  """

  alias SseGateway.{Config, Error, Event, HTTP}

  @doc "Sends `event`: `{:ok, id}` or `{:error, %SseGateway.Error{}}`."
  @spec send(Event.t(), map()) :: {:ok, String.t()} | {:error, Error.t()}
  def send(%Event{} = event, cfg), do: attempt(event, cfg, 0)

  defp attempt(event, cfg, n) do
    {path, body} = Event.request(event)
    headers = [{"idempotency-key", event.key}]

    case HTTP.post_json(path, body, headers, cfg) do
      {:ok, _status, %{"id" => id}, _headers} when is_binary(id) ->
        {:ok, id}

      {:ok, status, _other, _} ->
        {:error,
         %Error{
           status: status,
           code: "invalid_response",
           message: "no id in the gateway's answer"
         }}

      {:error, %Error{} = err} ->
        # A Retry-After longer than the longest backoff is the gateway asking
        # for more patience than a caller waiting on this call should have.
        if Error.transient?(err) and n < cfg.retries and
             (err.retry_after || 0) * 1000 <= cfg.backoff_max do
          Process.sleep(wait(err, cfg, n))
          attempt(event, cfg, n + 1)
        else
          {:error, err}
        end
    end
  end

  @doc false
  def wait(%Error{retry_after: nil}, cfg, n), do: Config.backoff(cfg, n)

  def wait(%Error{retry_after: s}, cfg, n),
    do: max(s * 1000, Config.backoff(cfg, n))
end
