defmodule SseGateway.HTTP do
  @moduledoc """
  Request/answer calls to the gateway over OTP's `:httpc`, in a profile of
  this application's own (`:sse_gateway`) so the host's default profile and
  its settings are never touched. Streams do not come through here (see
  `SseGateway.Stream`).

  Every failure becomes an `SseGateway.Error`; the body of a `2xx` is
  decoded JSON.
  """

  alias SseGateway.{Config, Error, JSON}

  @profile :sse_gateway

  @doc false
  def profile, do: @profile

  @doc false
  def start_profile do
    case :inets.start(:httpc, profile: @profile) do
      {:ok, _} -> :ok
      {:error, {:already_started, _}} -> :ok
      other -> other
    end
    |> case do
      :ok ->
        # Streams are not made here, so a few kept-alive connections suffice.
        :httpc.set_options([max_sessions: 8, keep_alive_timeout: 30_000], @profile)

      err ->
        err
    end
  end

  @doc """
  POSTs `body` (a term, encoded as JSON) to `path`. `{:ok, status, decoded,
  headers}` for a `2xx`; `{:error, %Error{}}` otherwise.
  """
  @spec post_json(String.t(), term(), [{String.t(), String.t()}], map()) ::
          {:ok, pos_integer(), term(), [{String.t(), String.t()}]} | {:error, Error.t()}
  def post_json(path, body, headers, cfg) do
    request(:post, path, JSON.encode!(body), headers, cfg)
  end

  @doc "GETs `path`: like `post_json/4`."
  def get(path, cfg), do: request(:get, path, nil, [], cfg)

  @doc false
  def request(method, path, body, headers, cfg) do
    url = cfg |> Config.url(path) |> String.to_charlist()
    ensure_ssl(url)

    headers =
      case Config.token(cfg) do
        nil -> headers
        token -> [{"authorization", "Bearer " <> token} | headers]
      end

    headers = Enum.map(headers, fn {k, v} -> {String.to_charlist(k), String.to_charlist(v)} end)

    req =
      case method do
        :get -> {url, headers}
        :post -> {url, headers, ~c"application/json", body}
      end

    http_opts = [timeout: cfg.timeout, connect_timeout: cfg.connect_timeout, autoredirect: false]

    http_opts =
      case url do
        ~c"https" ++ _ ->
          [
            {:ssl, Config.ssl_opts(cfg, String.to_charlist(URI.parse(to_string(url)).host))}
            | http_opts
          ]

        _ ->
          http_opts
      end

    case :httpc.request(method, req, http_opts, [body_format: :binary], @profile) do
      {:ok, {{_, status, _}, resp_headers, resp_body}} ->
        resp_headers = Enum.map(resp_headers, fn {k, v} -> {to_string(k), to_string(v)} end)
        answer(status, resp_headers, resp_body)

      {:error, reason} ->
        {:error, transport_error(reason)}
    end
  end

  defp answer(status, headers, body) when status in 200..299 do
    case JSON.decode(body) do
      {:ok, decoded} ->
        {:ok, status, decoded, headers}

      {:error, _} ->
        {:error,
         %Error{
           status: status,
           code: "invalid_response",
           message: "the gateway answered #{status} with a body that is not JSON"
         }}
    end
  end

  defp answer(status, headers, body) do
    {code, message} =
      case JSON.decode(body) do
        {:ok, %{"error" => %{"code" => c, "message" => m}}} -> {c, m}
        _ -> {"http_#{status}", "the gateway answered #{status}: #{String.slice(body, 0, 200)}"}
      end

    {:error,
     %Error{status: status, code: code, message: message, retry_after: retry_after(headers)}}
  end

  @doc false
  def retry_after(headers) do
    with {_, v} <- List.keyfind(headers, "retry-after", 0),
         {n, ""} <- Integer.parse(String.trim(v)) do
      max(n, 0)
    else
      _ -> nil
    end
  end

  defp transport_error(:timeout),
    do: %Error{
      code: "timeout",
      message: "no answer in time; retry with the same key",
      reason: :timeout
    }

  defp transport_error(reason) do
    %Error{
      code: "connection_failed",
      message: "no answer from the gateway (#{inspect(reason)}); retry with the same key",
      reason: reason
    }
  end

  defp ensure_ssl(~c"https" ++ _), do: {:ok, _} = Application.ensure_all_started(:ssl)
  defp ensure_ssl(_), do: :ok
end
